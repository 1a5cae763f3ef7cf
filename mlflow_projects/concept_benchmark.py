"""concept_benchmark entry point: the shape of the MAMMI paper's tables, reproduced on the phantom.

On the final-layer units of a registered classifier (unit ``c`` = the logit of class ``c``, whose ground
truth is the class name) it runs three comparisons and logs them as ONE table artifact
(``concept_benchmark/table.csv`` and ``.parquet``) plus flat metrics:

1. **concept-set ablation**: MAMMI with a generic English word list vs the nouns mined from the reports;
2. **example selection**: adaptive (MAMMI, ``alpha``) vs fixed top-k (WWW, ``k`` = 10 and ``--top-k``);
3. **method comparison** on the report nouns: ``mammi``, ``www``, ``clip_dissect``, ``falcon`` and, when
   the probing images have boxes, ``tsi`` (dissection of the class activation maps against the boxes).

Metrics per row (:func:`interpret.evaluation.evaluate_final_layer`): hit-rate, set precision / recall / F1,
cosine of the best concept and the class name under the CLIP text encoder and the sentence encoders,
each with its standard error.

    python -m mlflow_projects.concept_benchmark --data outputs/phantom/manifest.parquet \\
        --model-uri models:/cxr-classifier@candidate --clip models:/cxr-clip@candidate
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_projects.common import (DEFAULT_DATA, EXPERIMENTS, ensure_data, entry_parser, existing_file,
                                    finite_metrics, load_classifier, log_config, manifest_arg, nonneg_int,
                                    positive_int, print_table, quiet_console, resolve_clip, resolve_model_uri,
                                    run_cli, start_run, unit_float)

log = logging.getLogger(__name__)

PHANTOM_N = 400  # images of the phantom generated when the default data is missing


@dataclass
class BenchConfig:
    data: str = DEFAULT_DATA  # manifest of the probing set (generated phantom when the default is missing)
    model_uri: str = "models:/cxr-classifier@candidate"
    clip: str = "models:/cxr-clip@candidate"  # models:/ URI, open_clip spec, local-dir:, or "scratch"
    seed: int = 0
    split: str = "all"
    max_images: int = 512
    batch_size: int = 32
    generic_words: str = ""  # word-list file for the generic concept set (default: built-in list)
    reports: str = ""  # one report a line (default: the manifest's report column)
    max_concepts: int = 500
    alpha: float = 0.93
    beta: float = 0.95
    top_k: int = 40
    dissection_q: float = 0.04
    experiment: str = EXPERIMENTS["concept_benchmark"]


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = entry_parser("concept_benchmark", __doc__)
    p.add_argument("--data", type=manifest_arg, default=d.data, help="manifest of the probing set (a phantom is generated when the default is missing)")
    p.add_argument("--model-uri", default=d.model_uri, help="registered classifier whose final-layer units are annotated")
    p.add_argument("--clip", default=d.clip, help="VLM: models:/ URI, open_clip spec, local-dir:PATH or scratch")
    p.add_argument("--seed", type=nonneg_int, default=d.seed, help="seed of the probing-image draw")
    p.add_argument("--split", default=d.split, choices=["all", "train", "val", "test"],
                   help="manifest split the probing images come from")
    p.add_argument("--max-images", type=positive_int, default=d.max_images, help="probing images (drawn with --seed)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per forward pass")
    p.add_argument("--generic-words", type=lambda s: str(existing_file(s)) if s else "", default=d.generic_words,
                   help="word-list file for the generic concept set (default: the built-in list)")
    p.add_argument("--reports", type=lambda s: str(existing_file(s)) if s else "", default=d.reports,
                   help="reports file, one a line (default: the manifest's report column)")
    p.add_argument("--max-concepts", type=positive_int, default=d.max_concepts, help="largest mined concept set")
    p.add_argument("--alpha", type=unit_float, default=d.alpha, help="MAMMI adaptive selection threshold")
    p.add_argument("--beta", type=unit_float, default=d.beta, help="relative threshold of the concepts kept per unit")
    p.add_argument("--top-k", type=positive_int, default=d.top_k, help="fixed top-k of WWW")
    p.add_argument("--dissection-q", type=unit_float, default=d.dissection_q,
                   help="top fraction of each unit's activations that forms its TSI dissection mask")
    p.add_argument("--experiment", default=d.experiment, help="MLflow experiment name")
    a = p.parse_args(argv)
    return BenchConfig(**{k: getattr(a, k) for k in asdict(d)})


def final_layer(model, images, batch_size: int):
    """Logits (N, C) and class activation maps (N, C, h, w) of a GAP + linear classifier."""
    import torch

    logits, cams = [], []
    w = model.head.weight.detach()  # (C, K)
    with torch.no_grad():
        for lo in range(0, images.shape[0], batch_size):
            feats = model.forward_features(images[lo:lo + batch_size])  # (B, K, h, w)
            logits.append(model.forward_head(feats))
            cams.append(torch.einsum("bkhw,ck->bchw", feats, w))  # (B, C, h, w) CAM per class unit
    return torch.cat(logits), torch.cat(cams)


def run_benchmark(cfg: BenchConfig, model, probe, vlm, generic: Sequence[str]) -> "Any":
    """All comparisons on the final-layer units; returns the table (pandas DataFrame), one row per setting.

    Args:
        cfg: the configuration; model: a GAP + linear classifier (eval mode); probe: the probing set
            (:class:`interpret.audit.probe.Probe`); vlm: :class:`interpret.vlm.VLMAdapter`;
            generic: the generic control concept set.
    """
    import pandas as pd

    from interpret.annotation import annotate
    from interpret.concepts import BASE_TEMPLATE, concept_incidence, concept_prompts, mine_concepts
    from interpret.evaluation import evaluate_final_layer

    reports = [r for r in probe.reports if r.strip()]
    if cfg.reports:
        reports = [ln.strip() for ln in Path(cfg.reports).read_text(encoding="utf-8").splitlines() if ln.strip()]
    nouns = list(mine_concepts(reports, max_concepts=cfg.max_concepts)["concept"]) if reports else []
    logits, cams = final_layer(model, probe.images, cfg.batch_size)
    img = vlm.encode_images(probe.images)  # (N, d)
    tem = vlm.encode_texts([BASE_TEMPLATE])[0]
    sets = {"generic": list(generic), "report_nouns": nouns}
    emb = {name: vlm.encode_texts(concept_prompts(c)) for name, c in sets.items() if c}
    rows: list[dict[str, Any]] = []

    def add(study: str, concept_set: str, method: str, setting: str, table) -> None:
        predicted = [list(c) for c in table["concepts"]]
        metrics = evaluate_final_layer(predicted, probe.classes, vlm=vlm)
        rows.append({"study": study, "concept_set": concept_set, "method": method, "setting": setting,
                     "n_concepts": len(sets.get(concept_set, probe.classes)),
                     "predicted": json.dumps(dict(zip(probe.classes, predicted))), **metrics})

    def run(method: str, concept_set: str, **params):
        return annotate(method, logits, img, emb[concept_set], tem, concepts=sets[concept_set],
                        **({"beta": cfg.beta} if method in ("mammi", "www", "falcon") else {}), **params)

    for name in emb:  # 1. concept-set ablation
        add("concept_set", name, "mammi", f"alpha={cfg.alpha}", run("mammi", name, alpha=cfg.alpha))
    if "report_nouns" in emb:
        add("selection", "report_nouns", "mammi", f"adaptive alpha={cfg.alpha}", run("mammi", "report_nouns",
                                                                                       alpha=cfg.alpha))
        for k in sorted({10, cfg.top_k}):  # 2. fixed example selection
            add("selection", "report_nouns", "www", f"fixed top_k={k}", run("www", "report_nouns", top_k=k))
        # 3. method comparison
        add("methods", "report_nouns", "mammi", f"alpha={cfg.alpha}", run("mammi", "report_nouns", alpha=cfg.alpha))
        add("methods", "report_nouns", "www", f"top_k={cfg.top_k}", run("www", "report_nouns", top_k=cfg.top_k))
        add("methods", "report_nouns", "clip_dissect", "soft-WPMI defaults", run("clip_dissect", "report_nouns"))
        inc = concept_incidence(reports, nouns)
        add("methods", "report_nouns", "falcon", "top_k=10, nearest report",
            run("falcon", "report_nouns", report_embeddings=vlm.encode_texts(reports), report_concepts=[np.flatnonzero(r).tolist() for r in inc]))
    if any(len(b) for b in probe.boxes):
        from interpret.dissection import dissect_activations

        res = dissect_activations(cams, probe.boxes, probe.box_labels, probe.classes, probe.size,
                                  q=cfg.dissection_q, image_ids=probe.image_ids)
        table = annotate("tsi", logits, None, None, iou=res.iou, concepts=list(probe.classes))
        add("methods", "box_classes", "tsi", f"q={cfg.dissection_q}, IoU>0.04", table)
    else:
        log.info("no probing image has boxes: tsi skipped")
    return pd.DataFrame(rows)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark in an MLflow run; returns the run id."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow
    import torch

    from interpret.audit.probe import load_probe
    from interpret.concepts import GENERIC_WORDS, load_word_list
    from interpret.vlm import VLMAdapter

    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    manifest = ensure_data(cfg.data, 128, cfg.seed, PHANTOM_N)
    ident = resolve_model_uri(cfg.model_uri)  # unknown name / version / alias: an error before any download
    bundle, clip_desc = resolve_clip(cfg.clip)
    with start_run(cfg.experiment, run_name="concept_benchmark") as run, tempfile.TemporaryDirectory() as tmp:
        log_config(cfg)
        model, _meta = load_classifier(ident.uri, Path(tmp))
        size = int(model.input_spec.get("size", 224)) if hasattr(model, "input_spec") else 224
        probe = load_probe(manifest, model.class_names, size, cfg.split, cfg.max_images, cfg.seed)
        mlflow.set_tags({"model_uri": ident.uri, "clip": clip_desc, "manifest": str(manifest)})
        generic = load_word_list(cfg.generic_words) if cfg.generic_words else list(GENERIC_WORDS)
        table = run_benchmark(cfg, model, probe, VLMAdapter(bundle, batch_size=cfg.batch_size), generic)
        out = Path(tmp) / "concept_benchmark"
        out.mkdir()
        table.to_csv(out / "table.csv", index=False)
        table.to_parquet(out / "table.parquet", index=False)
        mlflow.log_artifacts(str(out), "concept_benchmark")
        for _, r in table.iterrows():
            key = f"{r['study']}.{r['concept_set']}.{r['method']}" + (
                f".k{r['setting'].split('=')[-1]}" if r["study"] == "selection" and r["method"] == "www" else "")
            mlflow.log_metrics(finite_metrics({f"{key}.{m}": r[m] for m in
                                               ("hit_rate", "f1", "cos_clip", "cos_minilm", "cos_mpnet") if m in r}))
    cols = [c for c in ("study", "concept_set", "method", "setting", "hit_rate", "f1", "cos_clip", "cos_minilm")
            if c in table]
    print_table(table[cols], f"concept benchmark: final-layer units of {ident.uri}, CLIP {clip_desc}, "
                             f"{probe.n} probing images")
    return run.info.run_id


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "concept_benchmark"))
