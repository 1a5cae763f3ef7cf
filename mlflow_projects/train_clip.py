"""MLflow entry point ``train_clip``: train a small CLIP on image-report pairs, evaluate, register ``cxr-clip``.

Steps: (1) data: the manifest (default: the phantom, generated when missing); (2) training of an open_clip
model (default ``cxr-minilm-rn``: a small ResNet image tower from scratch against the locked offline MiniLM
text tower; see :mod:`training.clip.train`) with a contrastive loss on the ``train`` split
(:func:`training.clip.train.train_clip`), logging per epoch ``loss``, ``lr``, ``logit_scale`` and on
``val`` the retrieval recall@1/5 both ways and the zero-shot AUROC per finding; (3) the same metrics on
``test`` (prefixed ``test.``); (4) the pyfunc of :mod:`mlflow_projects.pyfunc_clip` registered as
``cxr-clip`` with alias ``candidate`` and tags ``classes``, ``input``, ``open_clip_config``, ``kind``.

    python -m mlflow_projects.train_clip --data outputs/phantom/manifest.parquet --epochs 60

Load a registered version back as a bundle with :func:`mlflow_projects.common.resolve_clip`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mlflow_projects.common import (DEFAULT_DATA, EXPERIMENTS, choice_of, ensure_data, entry_parser, finite_metrics,
                                    int_at_least, log_config, manifest_arg, nonneg_int, positive_float,
                                    positive_int, print_table, quiet_console, register_version, run_cli,
                                    show_progress, start_run)

log = logging.getLogger(__name__)

EXPERIMENT = EXPERIMENTS["train_clip"]


@dataclass
class ClipRunConfig:
    data: str = DEFAULT_DATA
    model: str = "cxr-minilm-rn"
    epochs: int = 60
    image_size: int = 64
    seed: int = 0
    registered_name: str = "cxr-clip"
    batch_size: int = 64
    lr: float = 1e-3
    pretrained: str | None = None
    zero_shot: str = "contrast"
    phantom_n: int = 480  # images of the phantom generated when the default data is missing
    experiment: str = EXPERIMENT


def clip_model_spec(text: str) -> str:
    """argparse type: an open_clip model name, ``local-dir:``/``hf-hub:`` spec, config .json or folder."""
    import open_clip

    import training.clip  # noqa: F401  (registers cxr-tiny-vit)

    if text.startswith(("local-dir:", "hf-hub:")) or Path(text).exists() or text in open_clip.list_models():
        return text
    shipped = ", ".join(training.clip.list_configs())
    raise argparse.ArgumentTypeError(f"unknown CLIP model {text!r}; valid: an open_clip model name (shipped: {shipped}; "
                                     "all: open_clip.list_models()), 'local-dir:PATH', 'hf-hub:ORG/NAME', "
                                     "a model config .json or an HF CLIP folder")


def parse_args(argv: Sequence[str] | None = None) -> ClipRunConfig:
    from training.clip.train import ZERO_SHOT_MODES

    p = entry_parser("train_clip", __doc__)
    p.add_argument("--data", type=manifest_arg, default=DEFAULT_DATA, help="manifest with reports (default: the phantom, generated if missing)")
    p.add_argument("--model", type=clip_model_spec, default="cxr-minilm-rn")
    p.add_argument("--epochs", type=positive_int, default=60)
    p.add_argument("--image-size", type=int_at_least(8, "an image size"), default=64)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--registered-name", default="cxr-clip")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--pretrained", default="", help="local checkpoint file to start from (default: from scratch)")
    p.add_argument("--zero-shot", type=choice_of(ZERO_SHOT_MODES, "zero-shot mode"), default="contrast")
    p.add_argument("--phantom-n", type=positive_int, default=480)
    p.add_argument("--experiment", default=EXPERIMENT)
    a = p.parse_args(argv)
    if a.batch_size < 2:
        p.error(f"argument --batch-size: a contrastive batch needs >= 2 pairs, got {a.batch_size}")
    if a.pretrained and not Path(a.pretrained).is_file():
        p.error(f"argument --pretrained: file not found: {a.pretrained}")
    return ClipRunConfig(data=a.data, model=a.model, epochs=a.epochs, image_size=a.image_size, seed=a.seed,
                         registered_name=a.registered_name, batch_size=a.batch_size, lr=a.lr,
                         pretrained=a.pretrained or None, zero_shot=a.zero_shot, phantom_n=a.phantom_n,
                         experiment=a.experiment)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the entry point; returns the registered model version."""
    quiet_console()  # first: third-party libraries read their settings when imported
    import mlflow

    from mlflow_projects.pyfunc_clip import clip_meta, log_clip_model
    from training.clip.train import ClipTrainConfig, evaluate_clip, load_pairs, train_clip

    cfg = parse_args(argv)
    manifest = ensure_data(cfg.data, cfg.image_size, cfg.seed, cfg.phantom_n)
    tcfg = ClipTrainConfig(model=cfg.model, pretrained=cfg.pretrained, epochs=cfg.epochs, batch_size=cfg.batch_size,
                           lr=cfg.lr, image_size=cfg.image_size, seed=cfg.seed, zero_shot=cfg.zero_shot,
                           progress=show_progress())
    with start_run(cfg.experiment, run_name="train_clip") as run:
        log_config(cfg)
        mlflow.set_tags({"manifest": str(manifest), "open_clip_config": cfg.model})

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics(finite_metrics(metrics), step=epoch)

        result = train_clip(manifest, tcfg, callback=on_epoch)
        bundle, classes = result.bundle, result.classes
        final = dict(result.metrics)
        try:
            test = load_pairs(manifest, "test", cfg.image_size, classes, progress=show_progress())
            final.update({f"test.{k}": v for k, v in evaluate_clip(
                bundle, test, prompt_template=tcfg.prompt_template, negative_template=tcfg.negative_template,
                zero_shot=cfg.zero_shot).items()})
        except ValueError as exc:
            log.warning("no test evaluation: %s", exc)
        mlflow.log_metrics(finite_metrics({**{f"final.{k}": v for k, v in final.items() if not k.startswith("test.")},
                                    **{k: v for k, v in final.items() if k.startswith("test.")}}))
        mlflow.log_dict({"history": result.history, "final": final, "n_train": result.n_train,
                         "n_val": result.n_val}, "metrics.json")
        meta = clip_meta(bundle, classes, cfg.model, tcfg.prompt_template)
        info = log_clip_model(bundle, meta)
        tags = {"kind": "clip", "classes": classes, "input": meta["input"], "open_clip_config": cfg.model,
                "embed_dim": meta["embed_dim"], "train_run_id": run.info.run_id, "manifest": str(manifest)}
        for key in ("i2t_recall_at_5", "t2i_recall_at_5", "zs_auroc_mean"):
            if math.isfinite(final.get(key, float("nan"))):
                tags[f"val.{key}"] = round(final[key], 4)
        mv = register_version(info.model_uri, cfg.registered_name, tags,
                              description=f"CLIP {cfg.model} trained {cfg.epochs} epochs on {result.n_train} "
                                          f"image-report pairs of {Path(manifest).name}")
    log.info("registered %s version %s: %s", cfg.registered_name, mv.version, json.dumps(final, default=str)[:500])
    import pandas as pd

    keys = ("i2t_recall_at_5", "t2i_recall_at_5", "zs_auroc_mean")
    rows = [{"split": split, **{k: final.get(f"{prefix}{k}", float("nan")) for k in keys}}
            for split, prefix in (("val", ""), ("test", "test.")) if any(f"{prefix}{k}" in final for k in keys)]
    print_table(pd.DataFrame(rows), f"{cfg.registered_name} version {mv.version} (@candidate): retrieval recall@5 "
                                    f"and zero-shot AUROC")
    return str(mv.version)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "train_clip"))
