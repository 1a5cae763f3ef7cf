"""The model card of an audited version: what a compliance officer files, built only from what the audit
measured and what the caller knows about the model (its training run, its stated use).

Every field comes from ``summary.json`` or from :class:`CardFacts`; what neither knows is written as
**not known** (never boilerplate). The last section maps the card onto the documentation headings of
EU AI Act Article 13(3) (instructions for use; Regulation (EU) 2024/1689) and of the FDA's draft guidance
"Artificial Intelligence-Enabled Device Software Functions: Lifecycle Management and Marketing Submission
Recommendations" (January 2025), saying for each item which sections answer it, or that the card does not.

    card = build_model_card(summary, CardFacts(training=..., intended_use=...))
    Path("model_card.md").write_text(card.markdown); Path("model_card.html").write_text(card.html)
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["CardFacts", "ModelCard", "build_model_card", "SECTIONS", "ARTICLE_13_3", "FDA_AI_DSF_2025",
           "NOT_KNOWN"]

NOT_KNOWN = "not known"

#: (id, title) of every section, in order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("identity", "1. Model and provider"),
    ("intended_use", "2. Intended use and users"),
    ("inputs", "3. Inputs"),
    ("outputs", "4. Outputs and classes"),
    ("training_data", "5. Training data"),
    ("training_run", "6. Training run"),
    ("performance", "7. Performance per class"),
    ("thresholds", "8. Decision thresholds"),
    ("explanations", "9. Explanation behaviour"),
    ("limitations", "10. Limitations and known failure modes"),
    ("records", "11. Record-keeping and monitoring"),
    ("regulatory", "12. Regulatory mapping"),
)

# EU AI Act Art. 13(3): the content of the instructions for use. (item, text, sections that answer it,
# what the card cannot say)
ARTICLE_13_3: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("13(3)(a)", "identity and contact details of the provider (and authorised representative)", ("identity",),
     "contact details are stated by the provider, not measured"),
    ("13(3)(b)(i)", "intended purpose", ("intended_use",), ""),
    ("13(3)(b)(ii)", "level of accuracy (metrics), robustness and cybersecurity tested and expected; circumstances "
     "that may affect it", ("performance", "thresholds", "limitations"),
     "robustness is covered by the OOD detector and the randomisation test only; cybersecurity is not covered"),
    ("13(3)(b)(iii)", "known or foreseeable circumstances (intended use or misuse) that may lead to risks to health, "
     "safety or fundamental rights", ("limitations",), "no clinical risk analysis (ISO 14971) is part of the audit"),
    ("13(3)(b)(iv)", "technical capabilities to provide information relevant to explain the output",
     ("explanations",), ""),
    ("13(3)(b)(v)", "performance regarding specific persons or groups of persons", (),
     "the audit reports no per-group (age, sex, site, device) performance"),
    ("13(3)(b)(vi)", "specifications for the input data; training, validation and testing data used",
     ("inputs", "training_data"), ""),
    ("13(3)(b)(vii)", "information enabling deployers to interpret the output and use it appropriately",
     ("outputs", "thresholds", "explanations"), ""),
    ("13(3)(c)", "changes to the system and its performance pre-determined at the initial conformity assessment",
     (), "no pre-determined change plan is recorded; promotion gates decide which version is served"),
    ("13(3)(d)", "human oversight measures (Art. 14), incl. technical measures to help interpret the outputs",
     ("explanations", "limitations"), "organisational oversight measures are the deployer's and not known here"),
    ("13(3)(e)", "computational and hardware resources, expected lifetime, maintenance and care measures",
     ("inputs", "records"), "expected lifetime and maintenance schedule are not known"),
    ("13(3)(f)", "mechanisms to collect, store and interpret the logs (Art. 12)", ("records",), ""),
)

# FDA draft guidance (Jan. 2025), content of a marketing submission for an AI-enabled device software function.
FDA_AI_DSF_2025: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("Device description", "inputs and outputs, how AI achieves the intended use, intended users and setting",
     ("intended_use", "inputs", "outputs"), ""),
    ("User interface", "how users see and act on outputs", ("outputs", "explanations"),
     "screens and workflow are not described by the card"),
    ("Labeling", "model card, performance, limitations, instructions", ("performance", "limitations", "thresholds"), ""),
    ("Risk assessment", "risk management file (ISO 14971), hazards of AI outputs", ("limitations",),
     "no risk management file is part of the audit"),
    ("Data management", "data collection, reference standard, representativeness, splits, sequestration of test data",
     ("training_data",), "how labels were established (reference standard) is not known to the audit"),
    ("Model description", "architecture, features, inputs and outputs, training, thresholds",
     ("identity", "training_run", "thresholds"), ""),
    ("Validation: performance", "performance with confidence intervals, subgroup analyses",
     ("performance", "explanations"), "no subgroup analysis"),
    ("Validation: usability / human factors", "users' interpretation of the outputs", (),
     "no usability study is recorded"),
    ("Device performance monitoring", "post-market monitoring of performance and data drift", ("records",),
     "the service flags out-of-distribution inputs and keeps per-request records; no drift analysis is run"),
    ("Cybersecurity", "threat model, controls", (), "not covered beyond API keys on the service"),
)


@dataclass
class CardFacts:
    """What the card needs beyond ``summary.json``; leave a field None when it is not known.

    Attributes:
        provider: who provides the model (name and contact), as stated by them.
        intended_use: the intended purpose, as stated by the provider.
        intended_users: who is meant to use it.
        training: ``{run_id, params, manifest, manifest_sha256, sources, splits: {split: {images,
            positives: {class: n}}}}`` of the training run (missing keys: not known).
        audit_run_id: the MLflow run that holds this audit.
        service: ``{formats, min_image_side, max_pixels, methods, records_dir, retention_days, runtime}``.
        probe_sources: images per ``source`` in the probing set (``phantom``, ``nih``, ...).
    """

    provider: str | None = None
    intended_use: str | None = None
    intended_users: str | None = None
    training: Mapping[str, Any] | None = None
    audit_run_id: str | None = None
    service: Mapping[str, Any] | None = None
    probe_sources: Mapping[str, int] | None = None


@dataclass
class ModelCard:
    """The card as sections of blocks, rendered as Markdown and HTML."""

    title: str
    sections: list[tuple[str, str, list[tuple]]] = field(default_factory=list)  # (id, title, blocks)
    mapping: list[dict[str, Any]] = field(default_factory=list)

    @property
    def section_ids(self) -> list[str]:
        return [s[0] for s in self.sections]

    @property
    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for _, title, blocks in self.sections:
            out += [f"## {title}", ""]
            for block in blocks:
                out += _md_block(block) + [""]
        return "\n".join(out).rstrip() + "\n"

    @property
    def html(self) -> str:
        body = [f"<h1>{_e(self.title)}</h1>"]
        for sid, title, blocks in self.sections:
            body.append(f'<section id="{sid}"><h2>{_e(title)}</h2>')
            body += [_html_block(b) for b in blocks]
            body.append("</section>")
        css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d2330;"
               "line-height:1.45} h2{border-bottom:2px solid #e3e6ee;padding-bottom:.2em;margin-top:1.8em}"
               "table{border-collapse:collapse;margin:.5em 0;font-size:.92em}th,td{border:1px solid #d5d9e3;"
               "padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f2f4f8}"
               ".unknown{color:#8a4b00;font-style:italic}")
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(self.title)}</title>'
                f"<style>{css}</style></head><body>{''.join(body)}</body></html>")


# ---- rendering ------------------------------------------------------------------------------------
def _e(v: Any) -> str:
    return html.escape(str(v))


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_block(block: tuple) -> list[str]:
    kind = block[0]
    if kind == "p":
        return [block[1]]
    if kind == "list":
        return [f"- {item}" for item in block[1]] or [f"- {NOT_KNOWN}"]
    header, rows = block[1], block[2]
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return lines


def _html_text(text: str) -> str:
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))
    return s.replace(_e(NOT_KNOWN), f'<span class="unknown">{_e(NOT_KNOWN)}</span>')


def _html_block(block: tuple) -> str:
    kind = block[0]
    if kind == "p":
        return f"<p>{_html_text(block[1])}</p>"
    if kind == "list":
        return "<ul>" + "".join(f"<li>{_html_text(i)}</li>" for i in block[1]) + "</ul>"
    head = "".join(f"<th>{_e(h)}</th>" for h in block[1])
    rows = "".join("<tr>" + "".join(f"<td>{_html_text(c)}</td>" for c in row) + "</tr>" for row in block[2])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


# ---- formatting helpers -----------------------------------------------------------------------------
def _known(v: Any) -> str:
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return NOT_KNOWN
    return str(v)


def _n(v: Any, digits: int = 3) -> str:
    if v is None or isinstance(v, bool):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"
    return str(v)


def _ci(ci: Any) -> str:
    if not isinstance(ci, Mapping) or ci.get("estimate") is None:
        return "n/a"
    return f"{_n(ci.get('estimate'))} [{_n(ci.get('low'))}, {_n(ci.get('high'))}]"


def _is_phantom(sources: Mapping[str, int] | None) -> bool | None:
    if not sources:
        return None
    return set(sources) == {"phantom"}


def _sources_text(sources: Mapping[str, int] | None) -> str:
    if not sources:
        return NOT_KNOWN
    return ", ".join(f"{k} ({v} images)" for k, v in sorted(sources.items()))


# ---- the sections ---------------------------------------------------------------------------------
def _identity(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    m = s.get("model", {})
    t = f.training or {}
    rows = [("Registered model", _known(m.get("name"))), ("Version", _known(m.get("version"))),
            ("Model URI", _known(m.get("uri"))), ("Kind", _known(m.get("kind"))),
            ("Architecture", _known(m.get("arch"))), ("Head", _known(m.get("head"))),
            ("Training run", _known(t.get("run_id") or m.get("run_id"))),
            ("Audit run", _known(f.audit_run_id)), ("Audited (UTC)", _known(s.get("created"))),
            ("Audit status (promotion gates)", _known(s.get("status"))),
            ("Provider and contact", _known(f.provider))]
    return [("table", ("Field", "Value"), rows)]


def _intended_use(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    blocks = [("table", ("Field", "Value"), [("Intended purpose (stated by the provider)", _known(f.intended_use)),
                                             ("Intended users", _known(f.intended_users))])]
    if not f.intended_use:
        blocks.append(("p", "The provider has not stated an intended purpose (version tag `intended_use`, or "
                            "`--intended-use` of `python -m mlflow_projects.model_card`): it is not known, and "
                            "nothing in this card should be read as one."))
    m = s.get("model", {})
    blocks.append(("p", f"What the system does (from the model itself): a {m.get('task', 'multilabel')} classifier of "
                        f"{len(m.get('all_classes') or m.get('classes') or [])} chest X-ray findings that returns a "
                        "probability per finding, a call where a reliable threshold exists, and attention maps with "
                        "the audit's per-class verdict."))
    return blocks


def _inputs(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    spec = s.get("model", {}).get("input") or {}
    svc = f.service or {}
    def r4(v):
        return [round(float(x), 4) for x in v] if isinstance(v, (list, tuple)) else v

    norm = spec.get("normalisation") or (f"(x - mean) / std with mean {r4(spec.get('mean'))} and std "
                                         f"{r4(spec.get('std'))}, inside the model" if spec.get("mean") is not None
                                         else None)
    rows = [("Image size the model sees", f"{spec['size']} x {spec['size']} px (resized)" if spec.get("size")
             else NOT_KNOWN),
            ("Channels", _known(spec.get("channels"))),
            ("Pixel range fed to the model", _known(spec.get("range"))),
            ("Normalisation", _known(norm)),
            ("Accepted formats", _known(", ".join(svc["formats"]) if svc.get("formats") else None)),
            ("Smallest accepted side", f"{svc['min_image_side']} px" if svc.get("min_image_side") else NOT_KNOWN),
            ("Largest accepted image", f"{svc['max_pixels']:,} pixels" if svc.get("max_pixels") else NOT_KNOWN),
            ("Runtime", _known(svc.get("runtime")))]
    timings = s.get("timings") or {}
    blocks = [("table", ("Input", "Value"), rows)]
    if timings:
        blocks.append(("p", f"Audit compute: {sum(float(v) for v in timings.values()):.1f} s for "
                            f"{s.get('data', {}).get('n_images', '?')} probing images on the audit's machine "
                            "(per-section times in summary.json)."))
    return blocks


def _outputs(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    m = s.get("model", {})
    audited = set(m.get("classes") or [])
    not_audited = m.get("not_audited") or {}
    rows = [(c, "yes" if c in audited else f"no: {not_audited.get(c, 'not in the probing set')}")
            for c in (m.get("all_classes") or m.get("classes") or [])]
    methods = (f.service or {}).get("methods")
    return [("p", f"Task: {_known(m.get('task'))}. Per class: a probability (sigmoid of the logit), a threshold and "
                  "a call (null where the threshold is not reliable, section 8), and on request an attention map "
                  f"({', '.join(methods) if methods else NOT_KNOWN}) with the class's audit verdict (section 9), "
                  "the top units with the concepts that rest on enough evidence, and an out-of-distribution score."),
            ("table", ("Class", "Audited"), rows)]


def _training_data(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    t = f.training or {}
    splits = t.get("splits") or {}
    rows = [("Manifest", _known(t.get("manifest"))), ("Manifest SHA-256", _known(t.get("manifest_sha256"))),
            ("Source", _sources_text(t.get("sources")))]
    blocks = [("table", ("Field", "Value"), rows)]
    if splits:
        blocks.append(("table", ("Split", "Images"), [(k, _n(v.get("images"))) for k, v in splits.items()]))
        train = splits.get("train") or next(iter(splits.values()))
        n = train.get("images") or 0
        cls_rows = []
        for c, pos in (train.get("positives") or {}).items():
            ratio = f"{(n - pos) / pos:.1f} : 1" if pos else "no positives"
            cls_rows.append((c, *[_n((splits[k].get("positives") or {}).get(c)) for k in splits], ratio))
        blocks.append(("table", ("Class", *[f"{k} positives" for k in splits], "train negatives : positives"),
                       cls_rows))
    else:
        blocks.append(("p", f"Split sizes and class counts: {NOT_KNOWN} (the training run logged no "
                            "data/class_distribution.json)."))
    d = s.get("data", {})
    blocks.append(("p", f"The audit's probing set: {d.get('n_images', '?')} images of split '{d.get('split', '?')}' "
                        f"from {_known(d.get('manifest'))} (fingerprint {_known(d.get('fingerprint'))}; the manifest's "
                        f"sources: {_sources_text(f.probe_sources)}); {d.get('n_with_boxes', '?')} with boxes."))
    return blocks


def _training_run(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    t = f.training or {}
    params = t.get("params") or {}
    if not params:
        return [("p", f"Training run parameters: {NOT_KNOWN} (run {_known(t.get('run_id'))}).")]
    keep = [k for k in sorted(params) if not k.startswith("mlflow.")]
    return [("p", f"Run {_known(t.get('run_id'))}."), ("table", ("Parameter", "Value"), [(k, params[k]) for k in keep])]


def _performance(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    rows = []
    for r in s.get("performance") or []:
        rows.append((r.get("class"), _n(r.get("n_pos")), _n(r.get("n_neg")), _ci(r.get("auroc_ci")), _ci(r.get("ap_ci")),
                     _n(r.get("f1")), _n(r.get("mcc"))))
    if not rows:
        return [("p", f"Performance: {NOT_KNOWN} (the audit has no performance section).")]
    d = s.get("data", {})
    policy = s.get("verdict_policy") or {}
    return [("p", f"On the audit's probing set ({d.get('n_images', '?')} images; estimate [95% CI], "
                  f"{policy.get('n_resamples', 1000)} stratified bootstrap resamples). F1 and MCC at the thresholds "
                  "of section 8."),
            ("table", ("Class", "Positives", "Negatives", "AUROC [95% CI]", "AP [95% CI]", "F1", "MCC"), rows)]


def _thresholds(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    m = s.get("model", {})
    unreliable = m.get("unreliable_thresholds") or {}
    rows = [(c, _n(t) if t is not None else "none", unreliable.get(c, "reliable"))
            for c, t in zip(m.get("classes") or [], m.get("thresholds") or [])]
    params = (f.training or {}).get("params") or {}
    rule = ("Chosen per class at the maximum F1 on the validation split (predict positive when p >= threshold); a "
            f"class with fewer than {params.get('min_val_positives', 'the minimum')} validation positives gets none "
            "and the service makes no call for it.")
    return [("p", rule), ("table", ("Class", "Threshold", "Reliability"), rows)]


def _explanations(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    blocks: list[tuple] = []
    loc = s.get("localization") or {}
    blocks.append(("p", f"Audited attention method: {_known(loc.get('method'))} on layer "
                        f"{_known(s.get('model', {}).get('feature_layer'))}; the service serves the same maps "
                        "(ReLU, bilinear upsampling, min-max)."))
    rows = []
    for v in s.get("verdicts") or []:
        crit = v.get("criteria") or {}
        faith = (crit.get("faithfulness") or {}).get("metrics") or {}
        rows.append((v.get("class"), v.get("verdict"), "; ".join(v.get("reasons") or []) or "every criterion passed",
                     _ci((crit.get("localisation") or {}).get("lift")),
                     _ci((faith.get("deletion") or {}).get("gain")), _ci((faith.get("insertion") or {}).get("gain")),
                     (crit.get("sanity") or {}).get("status", "n/a")))
    if rows:
        blocks.append(("table", ("Class", "Verdict", "Why", "Pointing lift over chance [95% CI]",
                                 "Deletion gain over random [95% CI]", "Insertion gain over random [95% CI]",
                                 "Randomisation test"), rows))
    else:
        blocks.append(("p", f"Per-class verdicts: {NOT_KNOWN} (audit written before verdicts existed)."))
    san = s.get("sanity") or {}
    if san:
        th = san.get("thresholds") or {}
        per = {v.get("class"): ((v.get("criteria") or {}).get("sanity") or {}).get("status")
               for v in s.get("verdicts") or []}
        failed = [c for c, st in per.items() if st not in ("passed", None)]
        blocks.append(("p", f"Model-parameter randomisation test (cascading, {san.get('n_images', '?')} images): the "
                            f"maps must change once every block is randomised (mean Spearman < "
                            f"{th.get('max_spearman', '?')}, mean SSIM < {th.get('max_ssim', '?')}); "
                            + (f"not met for {', '.join(failed)}." if failed else
                               "met for every class." if per else f"per class {NOT_KNOWN}.")))
    c = s.get("concepts") or {}
    vlm = c.get("vlm_check") or {}
    if c.get("method"):
        per = vlm.get("per_class_ci") or {}
        blind = vlm.get("blind_classes") or [k for k, ci in per.items()
                                             if isinstance(ci, Mapping) and (ci.get("low") or 0) <= 0.5]
        layers = c.get("layers") or {}
        served = sum(int(v.get("n_sufficient") or 0) for v in layers.values())
        total = sum(int(v.get("units") or 0) for v in layers.values())
        blocks.append(("p", f"Unit concepts: {c['method']} with VLM {_known(c.get('clip'))} and concepts from "
                            f"{_known(c.get('source'))}; {served} of {total} units have a concept resting on at "
                            f"least {(c.get('params') or {}).get('min_evidence', '?')} images (only those are served). "
                            f"VLM check (zero-shot AUROC per class): mean {_n(vlm.get('auroc_mean'))}; classes the "
                            f"VLM cannot tell from chance (CI reaches 0.5): {', '.join(blind) or 'none'}."))
    else:
        blocks.append(("p", f"Unit concepts: not annotated for this model ({_known((s.get('sections') or {}).get('concepts', {}).get('reason'))})."))
    sc = s.get("shortcuts") or {}
    flagged = [r["class"] for r in sc.get("per_class") or [] if r.get("flagged")]
    if sc:
        blocks.append(("p", "Shortcut check (attention outside the lung field or on markers): flagged "
                            f"{', '.join(flagged) or 'no class'}."))
    return blocks


def _limitations(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    items = []
    for v in s.get("verdicts") or []:
        if v.get("verdict") != "fit":
            items.append(f"{v['class']}: explanations unfit ({'; '.join(v.get('reasons') or ['no reason recorded'])}); "
                         "the service marks its maps UNFIT.")
    m = s.get("model", {})
    for c, why in (m.get("unreliable_thresholds") or {}).items():
        items.append(f"{c}: {why}; no call is made.")
    for c, why in (m.get("not_audited") or {}).items():
        items.append(f"{c}: not audited ({why}).")
    c = s.get("concepts") or {}
    for layer, v in (c.get("layers") or {}).items():
        if v.get("below_min_evidence"):
            n_ann = int(v.get("n_annotated") or v.get("units") or 0)
            below = round(float(v["below_min_evidence"]) * n_ann)
            items.append(f"{layer}: {below} of {n_ann} annotated units rest on fewer than {v.get('min_evidence', '?')} "
                         "images; their concepts are withheld.")
    flagged = [r["class"] for r in (s.get("shortcuts") or {}).get("per_class") or [] if r.get("flagged")]
    if flagged:
        items.append(f"Possible shortcuts (attention mostly outside the lungs or on markers): {', '.join(flagged)}.")
    phantom = _is_phantom(f.probe_sources)
    if phantom:
        items.append("Validated on synthetic phantom images only: no figure in this card says how the model performs "
                     "on real radiographs.")
    elif phantom is None:
        items.append(f"Whether the probing set is real or synthetic: {NOT_KNOWN}.")
    if _is_phantom((f.training or {}).get("sources")):
        items.append("Trained on synthetic phantom images only.")
    d = s.get("data", {})
    if d.get("n_images") is not None and d["n_images"] < 200:
        items.append(f"Small probing set ({d['n_images']} images): the confidence intervals are wide.")
    ood = s.get("ood") or {}
    items.append("Inputs unlike the probing set are flagged by the OOD detector (threshold "
                 f"{_n(ood.get('threshold'))}, target false-alarm rate {_n(ood.get('target_false_alarm'))})."
                 if ood.get("fitted") else f"No out-of-distribution detector: {ood.get('reason', NOT_KNOWN)}.")
    items.append("No per-group (age, sex, site, device) performance was measured.")
    for name, sec in (s.get("sections") or {}).items():
        if isinstance(sec, Mapping) and sec.get("status") == "skipped":
            items.append(f"Audit section '{name}' skipped: {sec.get('reason', NOT_KNOWN)}")
    return [("list", items)]


def _records(s: Mapping[str, Any], f: CardFacts) -> list[tuple]:
    svc = f.service or {}
    return [("p", "The service writes one record per /predict, /explain and /feedback request (time, request id also "
                  "returned in X-Request-ID, model name/version/alias, audit run, route, method, layer, targets, input "
                  "SHA-256 and size, response digest, status, latency; no PHI) as daily JSON-lines files in "
                  f"{_known(svc.get('records_dir'))}, kept {_known(svc.get('retention_days'))} days. "
                  "`python -m mlflow_projects.serving.records verify|export` checks them and exports a period."),
            ("p", "Monitoring: the service counts out-of-distribution inputs (metric cxr_ood_flagged_total) and serves "
                  "the verdicts of the version's audit with every explanation.")]


def _regulatory(card: ModelCard) -> list[tuple]:
    known = {sid: blocks for sid, _, blocks in card.sections}

    def unknown_in(sections: Sequence[str]) -> list[str]:
        return [sid for sid in sections if any(NOT_KNOWN in " ".join(map(str, b[1:])) for b in known.get(sid, []))]

    titles = dict(SECTIONS)
    rows, mapping = [], []
    for regime, items in (("EU AI Act Art. 13(3)", ARTICLE_13_3), ("FDA AI-DSF draft guidance (Jan. 2025)",
                                                                  FDA_AI_DSF_2025)):
        for item, text, sections, gap in items:
            unknown = unknown_in(sections)
            st = "not covered" if not sections else "partly covered" if gap or unknown else "covered"
            gaps = [g for g in (gap, f"{NOT_KNOWN} in: {', '.join(titles[u] for u in unknown)}" if unknown else "")
                    if g]
            rows.append((regime, item, text, ", ".join(titles[sid] for sid in sections) or "none", st,
                         "; ".join(gaps) or "-"))
            mapping.append({"regime": regime, "item": item, "text": text, "sections": list(sections), "status": st,
                            "gap": "; ".join(gaps)})
    card.mapping = mapping
    return [("p", "Each documentation item, the sections of this card that answer it, and what the card cannot "
                  "answer. 'partly covered' also means a section it relies on has a field that is not known."),
            ("table", ("Regime", "Item", "Asks for", "Answered by", "Status", "Not covered"), rows)]


_BUILDERS = {"identity": _identity, "intended_use": _intended_use, "inputs": _inputs, "outputs": _outputs,
             "training_data": _training_data, "training_run": _training_run, "performance": _performance,
             "thresholds": _thresholds, "explanations": _explanations, "limitations": _limitations,
             "records": _records}


def build_model_card(summary: Mapping[str, Any], facts: CardFacts | None = None) -> ModelCard:
    """The model card of an audit's ``summary.json`` with the facts the caller knows.

    Args:
        summary: the audit's summary (:func:`interpret.audit.run_audit`).
        facts: what the audit does not measure (training run, stated use, service); None: all not known.

    Returns:
        A :class:`ModelCard` with every section of :data:`SECTIONS` and its regulatory ``mapping``.
    """
    facts = facts or CardFacts()
    m = summary.get("model", {})
    name = f"{m.get('name')} version {m.get('version')}" if m.get("name") else (m.get("uri") or "model")
    card = ModelCard(title=f"Model card: {name}")
    for sid, title in SECTIONS:
        if sid == "regulatory":
            continue
        card.sections.append((sid, title, _BUILDERS[sid](summary, facts)))
    card.sections.append(("regulatory", dict(SECTIONS)["regulatory"], _regulatory(card)))
    return card
