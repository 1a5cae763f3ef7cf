"""Self-contained HTML report of an interpretation audit (images inline as base64 PNGs).

Built only from what the audit wrote to its folder (``summary.json``, the tables, ``heatmaps/*.png``), so
``audit --resume`` never recomputes it and the report reads the same offline as in the MLflow UI. Written
for a non-engineer: each section says what was measured, shows the figures, and states what passed and
failed against the gates.

    html = build_report(summary, folder / "audit")
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["build_report", "bar_chart_png", "png_data_uri", "figure_png"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2330;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #e3e6ee;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #d5d9e3;padding:.25em .6em;
text-align:left} th{background:#f2f4f8} td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.15em .7em;border-radius:1em;font-weight:600;color:#fff}
.passed{background:#1e8a4c} .failed{background:#c0392b} .skipped{background:#8a8f99} .ok{background:#1e8a4c}
.warn{background:#fff4e5;border-left:4px solid #e67e22;padding:.4em .8em;margin:.4em 0}
.note{color:#5b6272;font-size:.92em} img{max-width:100%;border:1px solid #e3e6ee;margin:.3em 0}
.gallery{display:flex;flex-wrap:wrap;gap:.8em} .gallery figure{margin:0;max-width:520px}
figcaption{font-size:.85em;color:#5b6272} code,pre{background:#f4f5f8;padding:.1em .3em;border-radius:3px}
pre{padding:.6em;overflow-x:auto}
"""


# ---- small helpers ---------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return _e(value)


def _ci(ci: Any, digits: int = 3) -> str:
    """``estimate [low, high]`` of a CI dict (:meth:`interpret.stats.CI.to_dict`)."""
    if not isinstance(ci, Mapping):
        return "n/a"
    return (f"{_num(ci.get('estimate'), digits)} [{_num(ci.get('low'), digits)}, "
            f"{_num(ci.get('high'), digits)}]")


def _badge(status: str) -> str:
    return f'<span class="badge {_e(status)}">{_e(status)}</span>'


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
           headers: Mapping[str, str] | None = None, digits: int = 3) -> str:
    if not rows:
        return '<p class="note">(no rows)</p>'
    columns = list(columns or rows[0].keys())
    headers = dict(headers or {})
    head = "".join(f"<th>{_e(headers.get(c, c))}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            if isinstance(v, (list, tuple)):
                cells.append(f"<td>{_e(', '.join(map(str, v)))}</td>")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<td class="num">{_num(v, digits)}</td>')
            else:
                cells.append(f"<td>{_e('' if v is None else v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def png_data_uri(data: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="{png_data_uri(data)}">'


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout); the figure is closed."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def bar_chart_png(labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str,
                  ylim: tuple[float, float] | None = (0.0, 1.0), reference: float | None = None,
                  intervals: Mapping[str, Sequence[Any]] | None = None) -> bytes:
    """A grouped bar chart as PNG bytes (matplotlib, Agg backend; NaN bars are left empty).

    Args:
        labels: one label per group (x axis).
        series: name -> one value per label.
        title: chart title.
        ylim: y-axis limits, or None for automatic.
        reference: optional horizontal dashed line (e.g. a gate threshold).
        intervals: name -> one CI per label (a :meth:`interpret.stats.CI.to_dict` dict or None), drawn as
            error bars (the 95% CI of the bar).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    n, k = len(labels), max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * n * k / 1.5 + 2), 3.2), dpi=90)
    try:
        width = 0.8 / k
        x = np.arange(n)
        for i, (name, values) in enumerate(series.items()):
            vals = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
            pos = x + (i - (k - 1) / 2) * width
            ax.bar(pos, np.nan_to_num(vals, nan=0.0), width, label=name)
            cis = (intervals or {}).get(name)
            if cis:
                lo = np.array([np.nan if not c or c.get("low") is None else c["low"] for c in cis], dtype=float)
                hi = np.array([np.nan if not c or c.get("high") is None else c["high"] for c in cis], dtype=float)
                ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(vals)
                if ok.any():
                    ax.errorbar(pos[ok], vals[ok], yerr=[np.maximum(vals[ok] - lo[ok], 0), np.maximum(hi[ok] - vals[ok], 0)],
                                fmt="none", ecolor="#1d2330", elinewidth=1, capsize=2)
        if reference is not None:
            ax.axhline(reference, color="#c0392b", linestyle="--", linewidth=1)
        ax.set_xticks(x, [str(s) for s in labels], rotation=30, ha="right", fontsize=8)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(title, fontsize=10)
        if k > 1:
            ax.legend(fontsize=7, ncol=k)
    except Exception:
        plt.close(fig)
        raise
    return figure_png(fig)


def _read_parquet(path: Path):
    if not path.is_file():
        return None
    import pandas as pd

    return pd.read_parquet(path)


def _skipped(summary: Mapping[str, Any], section: str) -> str | None:
    info = summary.get("sections", {}).get(section, {})
    if info.get("status") == "skipped":
        return f'<p class="note">Section skipped: {_e(info.get("reason", "no reason recorded"))}</p>'
    return None


# ---- sections --------------------------------------------------------------------------------
def _device_text(dev: Any) -> str | None:
    """``cuda:0 (NVIDIA ...), chosen by auto`` from ``summary["device"]``; None for an audit that did not record it."""
    if not isinstance(dev, Mapping) or not dev.get("device"):
        return None
    name = f" ({dev['name']})" if dev.get("name") else ""
    return f"torch on {dev['device']}{name}, asked for as {dev.get('requested', 'auto')} ({dev.get('chosen_by', '')})"


def _header(s: Mapping[str, Any]) -> str:
    model, data = s.get("model", {}), s.get("data", {})
    ident = [("Model", f"{model.get('name') or '(unregistered)'} version {model.get('version') or '-'}"),
             ("Model URI", model.get("uri")), ("Architecture", model.get("arch")),
             ("Classes", ", ".join(model.get("classes", []))),
             ("Not audited", "; ".join(f"{c} ({why})" for c, why in (model.get("not_audited") or {}).items())),
             ("Stored thresholds", ", ".join(_num(t, 2) for t in model.get("thresholds", []))),
             ("Feature layer", model.get("feature_layer")), ("Penultimate layer", model.get("penultimate_layer")),
             ("Training run", model.get("run_id")), ("Run on", _device_text(s.get("device")))]
            
    data_rows = [("Manifest", data.get("manifest")), ("Data fingerprint", data.get("fingerprint")),
                 ("Split", data.get("split")), ("Images", data.get("n_images")),
                 ("Images with boxes", data.get("n_with_boxes")), ("Concept source", data.get("concept_source")),
                 ("Vision-language model", data.get("clip"))]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e('' if v is None else v)}</td></tr>" for k, v in ident if v)
    drows = "".join(f"<tr><th>{_e(k)}</th><td>{_e('' if v is None else v)}</td></tr>" for k, v in data_rows
                    if v is not None)
    return f"<h2>Model</h2><table>{rows}</table><h2>Data used</h2><table>{drows}</table>"


def _title(s: Mapping[str, Any]) -> str:
    model = s.get("model", {})
    status = s.get("status", "failed")
    who = f"{model.get('name') or model.get('uri') or 'model'} version {model.get('version') or '-'}"
    return (f"<h1>Interpretation audit {_badge(status)}</h1>"
            f"<p><b>{_e(who)}</b> ({_e(model.get('kind', 'classifier'))}, {_e(model.get('arch', ''))}) on "
            f"{_e(s.get('data', {}).get('n_images', '?'))} probing images.</p>"
            f"<p class='note'>Created {_e(s.get('created', ''))}. This report is self-contained: every figure "
            "is embedded.</p>")


_CRIT_TEXT = {"passed": "passed", "failed": "FAILED", "insufficient": "too few cases", "not_applicable": "n/a"}


def _crit(c: Mapping[str, Any], figure: str = "") -> str:
    status = c.get("status", "")
    text = _CRIT_TEXT.get(status, status)
    return f"{text}{(': ' + figure) if figure else ''}"


def _verdicts(s: Mapping[str, Any]) -> str:
    verdicts = s.get("verdicts") or []
    if not verdicts:
        return ""
    pol = s.get("verdict_policy", {})
    unfit = [v["class"] for v in verdicts if v["verdict"] != "fit"]
    lead = (f"<p><b>{len(verdicts) - len(unfit)} of {len(verdicts)} classes are fit for explanation.</b> "
            + (f"Unfit: {_e(', '.join(unfit))}. The service still returns their maps, with this verdict and its "
               "reasons attached, and draws the warning on the overlay." if unfit else "") + "</p>")
    rules = ("<p class='note'>A class is fit when every check that applies passed. Localisation: the pointing game "
             "beats its chance level (lower bound of the 95% bootstrap CI of hit &minus; chance above 0; "
             "n/a without boxes). Faithfulness: deleting the map's top pixels lowers the class probability faster, "
             "and inserting them raises it faster, than a random pixel order (lower CI bound of the AUC gain above "
             f"{_e(pol.get('min_gain', 0.01))} for both). Sanity: the maps change when the model's weights are randomised (cascading, from the "
             "head down). A check resting on fewer than "
             f"{_e(pol.get('min_cases', 5))} images counts as failed. Concepts are reported, not gated: "
             "the number of the class's top units whose concept rests on enough images and on a VLM that can "
             "see the class. Figures are estimate [95% CI].</p>")
    rows = []
    for v in verdicts:
        c = v.get("criteria", {})
        loc, fa, sa, co = (c.get(k, {}) for k in ("localisation", "faithfulness", "sanity", "concepts"))
        lift = _ci(loc.get("lift")) if loc.get("lift") else ""
        gains = (fa.get("metrics") or {})
        fig = "; ".join(f"{m} {_ci((gains.get(m) or {}).get('gain'))}" for m in ("deletion", "insertion") if m in gains)
        rho = "; ".join(f"{m} &rho; {_ci(ci, 2)}" for m, ci in (sa.get("final_spearman") or {}).items())
        th = v.get("threshold") or {}
        rows.append(
            f"<tr><td>{_e(v['class'])}</td><td>{_badge('passed' if v['verdict'] == 'fit' else 'failed').replace('>passed<', '>fit<').replace('>failed<', '>unfit<')}</td>"
            f"<td class='num'>{_e(v.get('n_positives', ''))}</td>"
            f"<td>{_e(_crit(loc, lift))}</td><td>{_e(_crit(fa, fig))}</td><td>{_crit(sa, rho)}</td>"
            f"<td>{_e(co.get('served', 'n/a'))} of {_e(co.get('n_top_units', '-'))}</td>"
            f"<td>{_e(_num(th.get('threshold'), 3) if th.get('reliable') else 'none: ' + str(th.get('reason', '')))}</td>"
            f"<td>{_e('; '.join(v.get('reasons', [])))}</td></tr>")
    head = ("<tr><th>class</th><th>verdict</th><th>positives</th><th>localisation (pointing lift)</th>"
            "<th>faithfulness (AUC gain vs random)</th><th>sanity (final Spearman)</th><th>served concepts</th>"
            "<th>threshold</th><th>reasons</th></tr>")
    return (f"<h2>Per-class verdicts</h2>{lead}{rules}<table>{head}{''.join(rows)}</table>")


def _gates(s: Mapping[str, Any]) -> str:
    g = s.get("gates", {})
    rows = [{"gate": r["name"], "figure": r["metric"] + (".<every class>" if r.get("per_class") else ""),
             "required": r["bound"], "value": r.get("value"), "result": r["status"],
             "failed classes": list(r.get("failed_classes") or []), "meaning": r.get("description", "")}
            for r in g.get("results", [])]
    body = _table(rows, digits=3).replace("<td>passed</td>", f"<td>{_badge('passed')}</td>") \
        .replace("<td>failed</td>", f"<td>{_badge('failed')}</td>").replace("<td>skipped</td>", f"<td>{_badge('skipped')}</td>")
    verdict = "passed every gate" if s.get("status") == "passed" else "did NOT pass the gates"
    return (f"<h2>Verdict against the promotion gates</h2><p>The audit {verdict} of <code>{_e(g.get('file', ''))}"
            f"</code>. Only versions whose latest audit passed can be promoted to <code>champion</code>.</p>{body}")


def _performance(s: Mapping[str, Any]) -> str:
    out = ["<h2>Classification performance</h2>",
           "<p>Per class, on the probing set, at the thresholds stored with the model: AUROC and average "
           "precision (threshold-free), F1 and Matthews correlation (at the threshold).</p>"]
    skipped = _skipped(s, "performance")
    if skipped:
        return "".join(out) + skipped
    rows = s.get("performance", [])
    shown = [{"class": r["class"], "positives": r.get("n_pos"), "negatives": r.get("n_neg"),
              "AUROC [95% CI]": _ci(r.get("auroc_ci")) if r.get("auroc_ci") else _num(r.get("auroc")),
              "AP [95% CI]": _ci(r.get("ap_ci")) if r.get("ap_ci") else _num(r.get("ap")),
              "F1": r.get("f1"), "MCC": r.get("mcc"),
              "threshold": _num(r.get("threshold")) if r.get("threshold_reliable", True) else "none (too few validation positives)"}
             for r in rows]
    out.append(_table(shown))
    unreliable = s.get("model", {}).get("unreliable_thresholds") or {}
    if unreliable:
        out.append("<div class='warn'><b>No reliable threshold</b> (no calls are made, /predict returns "
                   "<code>positive: null</code>): " + "; ".join(f"{_e(k)}: {_e(v)}" for k, v in unreliable.items())
                   + "</div>")
    if rows:
        png = bar_chart_png([r["class"] for r in rows], {"AUROC": [r.get("auroc") for r in rows],
                                                         "AP": [r.get("ap") for r in rows]},
                            "AUROC and AP per class (error bars: 95% CI)",
                            intervals={"AUROC": [r.get("auroc_ci") for r in rows], "AP": [r.get("ap_ci") for r in rows]})
        out.append(_img(png, "performance per class"))
    return "".join(out)


def _tol(loc: Mapping[str, Any]) -> str:
    tol = loc.get("pointing_tolerance_px")
    return "0" if tol is None else f"{float(tol):.1f}"


def _localization(s: Mapping[str, Any], folder: Path) -> str:
    loc = s.get("localization", {})
    out = ["<h2>Localisation: does the model look at the finding?</h2>",
           f"<p>Attention maps ({_e(loc.get('method', 'cam'))}; ReLU, then min-max normalised: the maps /explain serves) "
           "against the annotated boxes. "
           "Soft IoBB = share of the box covered by attention (sum(A&middot;M)/sum(M)); soft IoR = share of the "
           "attention inside the box (sum(A&middot;M)/sum(A)); pointing game = the map's maximum falls in a "
           f"box or within {_e(_tol(loc))} px of it (Zhang et al.: 15 px at 224 px, scaled; a maximum "
           "reached on several pixels scores the share of them that hit); pointing chance = the hit rate "
           "of a map pointing anywhere at random, the bar the pointing game should clear.</p>"]
    skipped = _skipped(s, "localization")
    if skipped:
        return "".join(out) + skipped
    rows = loc.get("per_class", [])
    out.append(_table([{"class": r["class"], "images": r.get("n_images"),
                        "IoBB [95% CI]": _ci(r.get("iobb_ci")) if r.get("iobb_ci") else _num(r.get("iobb")),
                        "IoR [95% CI]": _ci(r.get("ior_ci")) if r.get("ior_ci") else _num(r.get("ior")),
                        "pointing [95% CI]": _ci(r.get("pointing_ci")) if r.get("pointing_ci") else _num(r.get("pointing")),
                        "pointing chance": r.get("pointing_chance"),
                        "lift over chance [95% CI]": _ci(r.get("pointing_lift_ci"))} for r in rows]))
    if rows:
        png = bar_chart_png([r["class"] for r in rows], {"IoBB": [r.get("iobb") for r in rows],
                                                         "IoR": [r.get("ior") for r in rows],
                                                         "pointing": [r.get("pointing") for r in rows],
                                                         "pointing chance": [r.get("pointing_chance") for r in rows]},
                            "Localisation per class (error bars: 95% CI)",
                            intervals={"IoBB": [r.get("iobb_ci") for r in rows], "IoR": [r.get("ior_ci") for r in rows],
                                       "pointing": [r.get("pointing_ci") for r in rows]})
        out.append(_img(png, "localisation per class"))
    names = loc.get("gallery")
    gallery = ([folder / "heatmaps" / n for n in names if (folder / "heatmaps" / n).is_file()] if names is not None
               else sorted(p for p in (folder / "heatmaps").glob("*.png")
                           if not p.name.startswith(("faithfulness_", "sanity_")))
               if (folder / "heatmaps").is_dir() else [])
    if gallery:
        out.append("<h3>Attention gallery (best and worst cases per class)</h3><div class='gallery'>")
        for p in gallery:
            out.append(f"<figure>{_img(p.read_bytes(), p.stem)}<figcaption>{_e(p.stem)}</figcaption></figure>")
        out.append("</div>")
    return "".join(out)


def _faithfulness(s: Mapping[str, Any], folder: Path) -> str:
    f = s.get("faithfulness") or {}
    if not f:
        return ""
    out = ["<h2>Faithfulness: do the highlighted pixels drive the prediction?</h2>",
           f"<p>On each class's positive probing images ({_e(f.get('cases', ''))}), pixels are removed "
           f"(<i>deletion</i>: replaced by a {_e(f.get('baseline', ''))} copy of the image) or revealed "
           "(<i>insertion</i>: from that copy) in the order of the served map, in "
           f"{_e(f.get('steps', ''))} equal steps, and the class probability is recorded (Petsiuk et al. 2018). "
           "The same is done in a seeded random pixel order. A faithful map makes the probability fall faster "
           "under deletion (lower AUC than random) and rise faster under insertion (higher AUC). ROAD "
           "(Rong et al. 2022) removes pixels with noisy linear imputation instead, most-relevant first (MoRF, lower "
           "is better) and least-relevant first (LeRF, higher is better), and compares the two (LeRF &minus; MoRF "
           "&gt; 0 for a faithful map; reported, not gated). <i>Gain</i> = advantage over the random "
           "order (&gt; 0: more faithful than random), averaged over images with a 95% bootstrap CI.</p>"]
    skipped = _skipped(s, "faithfulness")
    if skipped:
        return "".join(out) + skipped
    rows = []
    for v in s.get("verdicts") or []:
        ms = (v.get("criteria", {}).get("faithfulness", {}).get("metrics") or {})
        if not ms:
            continue
        gated = [m.get("n", 0) for k, m in ms.items() if k in ("deletion", "insertion")]
        row = {"class": v["class"], "images": max(gated or [m.get("n", 0) for m in ms.values()])}
        for name in ("deletion", "insertion"):
            m = ms.get(name)
            if m:
                row[f"{name} AUC (random order)"] = (f"{_num((m.get('auc') or {}).get('estimate'))} "
                                                     f"({_num((m.get('random_auc') or {}).get('estimate'))})")
                row[f"{name} gain [95% CI]"] = _ci(m.get("gain"))
        if ms.get("road"):
            row["ROAD images"] = ms["road"].get("n")
            row["ROAD MoRF / LeRF AUC"] = (f"{_num((ms.get('road_morf', {}).get('auc') or {}).get('estimate'))} / "
                                           f"{_num((ms.get('road_lerf', {}).get('auc') or {}).get('estimate'))}")
            row["ROAD LeRF &minus; MoRF [95% CI]"] = _ci(ms["road"].get("lerf_minus_morf"))
        rows.append(row)
    out.append(_table(rows))
    for metric, name in (f.get("plots") or {}).items():
        path = folder / "heatmaps" / name
        if path.is_file():
            out.append(f"<figure>{_img(path.read_bytes(), metric + ' curves')}<figcaption>{_e(metric)}: mean curve "
                       "per class with its 95% interval (solid: the map's order; dashed: random order)"
                       "</figcaption></figure>")
    return "".join(out)


def _sanity(s: Mapping[str, Any], folder: Path) -> str:
    sa = s.get("sanity") or {}
    if not sa:
        return ""
    th = sa.get("thresholds", {})
    passed = sa.get("passed")
    out = ["<h2>Sanity check: do the maps depend on the model?</h2>",
           "<p>Model-parameter randomisation test (Adebayo et al. 2018): the model's blocks are re-initialised "
           "from the head down (cascading) and one at a time (independent), and the maps of the same "
           f"{_e(sa.get('n_images', ''))} images are compared with the original ones by Spearman rank correlation "
           "and SSIM. A map that stays the same when the weights it claims to explain are gone is not explaining "
           f"them. A step changed the maps when mean Spearman &lt; {_e(th.get('max_spearman', ''))} and mean SSIM "
           f"&lt; {_e(th.get('max_ssim', ''))}. Result: "
           f"{_badge('passed' if passed else 'failed') if passed is not None else 'n/a'}. {_e(sa.get('note', ''))}</p>"]
    for meth, modes in (sa.get("methods") or {}).items():
        for mode, info in modes.items():
            rows = [{"step": st["step"], "randomised block": st["layer"] + (" (and all above)" if mode == "cascading" and st["step"] > 1 else ""),
                     "Spearman [95% CI]": _ci(st.get("spearman"), 2), "SSIM [95% CI]": _ci(st.get("ssim"), 2),
                     "changed": "yes" if st.get("changed") else "NO"} for st in info.get("steps", [])]
            out.append(f"<h3>{_e(meth)}, {_e(mode)}: {'passed' if info.get('passed') else 'failed'}</h3>{_table(rows)}")
    plot = sa.get("plot")
    if plot and (folder / "heatmaps" / plot).is_file():
        out.append(f"<figure>{_img((folder / 'heatmaps' / plot).read_bytes(), 'cascading randomisation')}"
                   "<figcaption>One image's map on the original model and after each cascading step</figcaption></figure>")
    return "".join(out)


def _ood(s: Mapping[str, Any]) -> str:
    o = s.get("ood") or {}
    if not o:
        return ""
    out = ["<h2>Inputs the model was not audited for</h2>"]
    if not o.get("fitted"):
        return "".join(out) + f"<p class='note'>No detector fitted: {_e(o.get('reason', ''))}</p>"
    keep = {k: v for k, v in o.items() if not isinstance(v, (dict, list)) and k not in ("fitted", "file")}
    out.append("<p>The service scores every request's pooled feature-layer activations against the statistics of "
               "this probing set (Mahalanobis distance with a shrinkage covariance) and warns above a threshold "
               "calibrated on held-out probing images.</p>")
    out.append(_table([{"figure": k, "value": v} for k, v in keep.items()]))
    return "".join(out)


def _dissection(s: Mapping[str, Any]) -> str:
    d = s.get("dissection", {})
    out = ["<h2>Network dissection (feature layer)</h2>",
           f"<p>Each unit's map is thresholded at its dataset quantile 1-q (q = {_e(d.get('quantile', ''))}); "
           "connected regions overlapping a box of the class are counted. Disjoint = regions over all units / "
           "images; Unique = units with at least one such region / images.</p>"]
    skipped = _skipped(s, "dissection")
    if skipped:
        return "".join(out) + skipped
    rows = d.get("per_class", [])
    out.append(_table(rows))
    if rows:
        png = bar_chart_png([r["class"] for r in rows], {"Disjoint": [r.get("disjoint") for r in rows],
                                                         "Unique": [r.get("unique") for r in rows]},
                            "Dissection counts per class (means over images; no CI)", ylim=None)
        out.append(_img(png, "dissection per class"))
    return "".join(out)


def _concepts(s: Mapping[str, Any], folder: Path, top: int = 12) -> str:
    c = s.get("concepts", {})
    out = ["<h2>What the neurons encode (concept annotation)</h2>",
           f"<p>Method <code>{_e(c.get('method', ''))}</code>: each unit is described by concepts mined from "
           f"radiology reports ({_e(c.get('n_concepts', 0))} concepts), scored with a vision-language model on "
           "the images that activate the unit most.</p>"]
    skipped = _skipped(s, "concepts")
    if skipped:
        return "".join(out) + skipped
    check = c.get("vlm_check") or {}
    if check:
        mean = check.get("auroc_mean")
        verdict = ("" if check.get("supported", True) else
                   " <b>The VLM does not tell these findings apart (0.5 = chance): the concept names below are not "
                   "supported by evidence.</b>")
        prompt = str(check.get("prompt", "")).replace("{concept}", "<class>").replace("{}", "<class>")
        out.append(f"<p>VLM check ({_e(c.get('clip', ''))}): zero-shot AUROC of the image-text similarity with "
                   f"&ldquo;{_e(prompt)}&rdquo; on the probing set, mean "
                   f"{_e('n/a' if mean is None else f'{mean:.3f}')}.{verdict}</p>")
        cis = check.get("per_class_ci") or {}
        blind = set(check.get("blind_classes") or [])
        out.append(_table([{"class": k, "zero-shot AUROC [95% CI]": _ci(cis.get(k)) if cis.get(k) else _num(v),
                            "VLM sees it": "NO (concepts tied to it are not served)" if k in blind else "yes"}
                           for k, v in check.get("per_class", {}).items()]))
    layers = c.get("layers", {})
    out.append(_table([{"layer": k, **v} for k, v in layers.items()]))
    table = _read_parquet(folder / "concepts.parquet")
    min_ev = (c.get("params") or {}).get("min_evidence", 10)
    if table is not None and len(table):
        out.append(f"<p>Only annotations resting on at least {_e(min_ev)} representative images, and not tied to a "
                   "class the VLM cannot see, are served; the tables below list those, best score first.</p>")
        for layer, part in table.groupby("layer", sort=False):
            part = part.copy()
            if "sufficient" in part:
                part = part[part["sufficient"].astype(bool) & ~part.get("vlm_blind", False).astype(bool)]
            part["best"] = [float(sc[0]) if len(sc) else float("nan") for sc in part["scores"]]
            part = part[part["best"].notna()].sort_values("best", ascending=False).head(top)
            rows = [{"unit": int(r.unit), "concepts": list(r.concepts)[:5], "best score": r.best,
                     "evidence (images)": int(getattr(r, "evidence", 0)), "margin": getattr(r, "margin", None)}
                    for r in part.itertuples()]
            out.append(f"<h3>Layer {_e(layer)}: top {len(rows)} served units</h3>{_table(rows, digits=4)}")
    comp = c.get("final_layer_comparison") or {}
    if comp:
        methods = comp.get("methods") or {}
        figures = sorted({f for m in methods.values() for f in (m.get("figures") or {})})
        rows = []
        for name, m in methods.items():
            ev = m.get("evidence") or {}
            rows.append({"selection": name, "units annotated": m.get("n_annotated"),
                         "evidence min / median": f"{_num(ev.get('evidence_min'), 0)} / {_num(ev.get('evidence_median'), 1)}",
                         **{f: _ci((m.get("figures") or {}).get(f)) for f in figures}})
        if comp.get("difference"):
            rows.append({"selection": comp.get("difference_of", "difference"), "units annotated": "",
                         "evidence min / median": "", **{f: _ci(comp["difference"].get(f)) for f in figures}})
        out.append("<h3>Evidence floor: the paper's selection vs <code>mammi_floor</code> on the final layer</h3>"
                   "<p>The class units are annotated by MAMMI's adaptive selection (alpha 0.93: few images per unit) "
                   "and by the same selection with a floor of images (<code>mammi_floor</code>); figures are "
                   f"estimate [95% CI] ({_e(comp.get('basis', ''))}).</p>{_table(rows)}")
    ev = s.get("evaluation", {})
    if ev:
        out.append("<h3>Check on the final layer (class neurons vs their class names)</h3>"
                   "<p>The final-layer neurons have known meanings (their class), so annotating them measures "
                   "the annotation method itself.</p>")
        if any(str(k).startswith("cos_vlm") for k in ev):
            from interpret.audit.concepts import COS_VLM_NOTE

            out.append(f"<p class='note'>{_e(COS_VLM_NOTE)}.</p>")
        out.append(_table([{"figure": k, "value": v} for k, v in ev.items() if not isinstance(v, (list, dict))]))
    return "".join(out)


def _importance(s: Mapping[str, Any]) -> str:
    imp = s.get("importance", {})
    out = ["<h2>Which units drive each class (neuron importance)</h2>",
           "<p>Contribution of each feature-layer unit to the class score (weight &times; mean activation on the "
           "class's positive images), with the unit's concepts; <i>related</i> marks a concept that names or "
           "is a synonym of the class.</p>"]
    skipped = _skipped(s, "importance")
    if skipped:
        return "".join(out) + skipped
    rows = []
    for cls, units in imp.get("per_class", {}).items():
        for u in units:
            rows.append({"class": cls, "unit": u.get("unit"), "importance": u.get("score"),
                         "concepts (served)": u.get("concepts", [])[:4], "evidence": u.get("evidence"),
                         "related": "yes" if u.get("related") else "",
                         "withheld": (f"{', '.join(u.get('annotated_concepts', [])[:3])}: {u['withheld']}"
                                      if u.get("withheld") else "")})
    out.append(_table(rows, digits=4))
    return "".join(out)


def _shortcuts(s: Mapping[str, Any]) -> str:
    sc = s.get("shortcuts", {})
    out = ["<h2>Shortcut warnings</h2>", f"<p>{_e(sc.get('method', ''))}</p>"]
    skipped = _skipped(s, "shortcuts")
    if skipped:
        return "".join(out) + skipped
    warnings = sc.get("warnings", [])
    if warnings:
        for w in warnings:
            out.append(f"<div class='warn'><b>{_e(w['kind'])} {_e(w['target'])}</b>: {_e(w['reason'])}</div>")
    else:
        out.append("<p>No class or unit was flagged.</p>")
    out.append("<h3>Attention mass per class</h3>")
    out.append(_table(sc.get("per_class", [])))
    return "".join(out)


def _comparison(s: Mapping[str, Any]) -> str:
    cmp = s.get("comparison")
    if not cmp:
        return ""
    from interpret.audit.diff import comparison_html

    return comparison_html(cmp)


def _reproduce(s: Mapping[str, Any]) -> str:
    sections = s.get("sections", {})
    rows = [{"section": k, "status": v.get("status"), "note": v.get("reason", "")} for k, v in sections.items()]
    return ("<h2>How to reproduce</h2><p>Run from the project folder (same data, same model version):</p>"
            f"<pre>{_e(s.get('reproduce', ''))}</pre><h3>Sections</h3>{_table(rows)}"
            f"<p class='note'>Configuration: <code>{_e(s.get('config', {}))}</code></p>")


def build_report(summary: Mapping[str, Any], folder: str | Path) -> str:
    """Render the audit report.

    Args:
        summary: the audit summary (``summary.json`` content).
        folder: the audit artifact folder (holds the tables and ``heatmaps/``).

    Returns:
        A complete HTML document (str) with every image embedded as a base64 PNG.
    """
    from interpret.audit.diff import upgrade_summary

    summary = upgrade_summary(summary)  # an older audit's summary renders with today's names
    folder = Path(folder)
    model = summary.get("model", {})
    title = f"Audit of {model.get('name') or model.get('uri', 'model')} v{model.get('version') or '-'}"
    parts: Iterable[str] = (
        _title(summary), _verdicts(summary), _gates(summary), _header(summary), _performance(summary),
        _localization(summary, folder), _faithfulness(summary, folder), _sanity(summary, folder),
        _dissection(summary), _concepts(summary, folder), _importance(summary), _shortcuts(summary), _ood(summary),
        _comparison(summary), _reproduce(summary),
    )
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
