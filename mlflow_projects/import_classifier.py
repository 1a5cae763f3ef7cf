"""MLflow entry point ``import_classifier``: register an existing chest X-ray classifier as a ``cxr-classifier`` version.

Bring your own model: a TorchXRayVision model class (``xrv:DenseNet``) with a local state dict, a timm or
torchvision architecture (``timm:vit_tiny_patch16_224``, ``torchvision:resnet50``) with a local state dict, a
TorchScript file (``torchscript:model.pt``) or a Python factory (``factory:mypkg.models:build`` with
``--model-kwargs``). Nothing is downloaded. :func:`training.imported.import_model` wraps it in the contract of a
trained classifier ((B, 1, S, S) images in [0, 1]; the model's scaling, channel repeat and mean/std inside), and
this entry point registers it exactly as ``train_classifier`` does: the pyfunc of
:mod:`mlflow_projects.pyfunc_classifier` (checkpoint, ONNX checked against eager where the model exports, else
the service's torch path, meta), version tags ``classes``, ``thresholds`` (``null`` = none), ``threshold_positives``,
``min_val_positives``, ``input``, ``feature_layer``, ``head``, ``source``, alias ``candidate``.

Thresholds: ``--thresholds`` (one per class; ``null`` for none), or ``--calibrate-on MANIFEST`` (max F1 on its
``val`` split; a class with fewer than ``--min-val-positives`` positives gets none), or neither (no calls: the
service returns probabilities only). Every input is checked (weights that do not fit the architecture name the
first mismatches; an output width that differs from the class list, a non-image input spec, a factory that cannot
be imported) before anything is registered.

    python -m mlflow_projects.import_classifier --source xrv:DenseNet --weights densenet121-res224-all.pt \
        --calibrate-on outputs/phantom/manifest.parquet
    python -m mlflow_projects.import_classifier --source timm:vit_tiny_patch16_224 --weights vit.pt \
        --classes Effusion,Nodule,Mass --image-size 224 --channels 1
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mlflow_projects.common import (EXPERIMENTS, choice_of, entry_parser, int_at_least, log_config, manifest_arg,
                                    positive_int, quiet_console, register_version, run_cli, start_run)

log = logging.getLogger(__name__)

OUTPUTS = ("logits", "probabilities")


@dataclass
class ImportConfig:
    """The resolved configuration of one import (logged as ``config.json``)."""

    source: str = ""
    weights: str | None = None
    classes: list[str] | None = None  # None: the model's own (TorchXRayVision targets)
    image_size: int = 224
    channels: int | None = None  # None: 1 for xrv, else 3
    scale: list[float] | None = None  # None: [-1024, 1024] for xrv, else [0, 1]
    mean: list[float] | None = None
    std: list[float] | None = None
    outputs: str = "logits"
    feature_layer: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    thresholds: list[float] | None = None  # NaN = none for that class
    calibrate_on: str | None = None
    min_val_positives: int = 5
    batch_size: int = 32
    registered_name: str = "cxr-classifier"
    experiment: str = EXPERIMENTS["train_classifier"]


def _floats(text: str, what: str, allow_null: bool = False) -> list[float] | None:
    """Comma-separated or JSON list of numbers ('' = None); ``null``/``none`` allowed when ``allow_null``."""
    text = str(text).strip()
    if not text:
        return None
    try:
        items = json.loads(text) if text.startswith("[") else [t.strip() for t in text.split(",")]
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{what}: not a JSON list: {text!r}") from None
    out = []
    for item in items:
        if allow_null and (item is None or str(item).lower() in ("null", "none", "nan", "")):
            out.append(float("nan"))
            continue
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{what}: expected numbers{' or null' if allow_null else ''}, got "
                                             f"{item!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{what}: expected finite numbers, got {item!r}")
        out.append(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = entry_parser("import_classifier", __doc__)
    p.add_argument("--source", required=True,
                   help="xrv:<Class> | timm:<name> | torchvision:<name> | torchscript:<file> | factory:<module>:<function>")
    p.add_argument("--weights", default="", help="local state dict ('' = the architecture's own initialisation)")
    p.add_argument("--classes", default="", help="class names, comma-separated or a JSON list (default for xrv: "
                                                 "its targets mapped to NIH spellings)")
    p.add_argument("--image-size", type=int_at_least(16, "an image size"), default=224)
    p.add_argument("--channels", type=choice_of(["", "1", "3"], "channels"), default="",
                   help="the model's input channels ('' = 1 for xrv, else 3); grey images are repeated to 3")
    p.add_argument("--scale", default="", help="lo,hi: what [0, 1] becomes before mean/std ('' = -1024,1024 for "
                                               "xrv, else 0,1)")
    p.add_argument("--mean", default="", help="one value or one per channel ('' = the source's default)")
    p.add_argument("--std", default="", help="one value or one per channel ('' = the source's default)")
    p.add_argument("--outputs", type=choice_of(OUTPUTS, "outputs"), default="logits",
                   help="what the network returns (probabilities are turned into logits)")
    p.add_argument("--feature-layer", default="", help="dotted module name in the network ('' = found automatically)")
    p.add_argument("--model-kwargs", default="{}", help="JSON object of the architecture's or factory's arguments")
    p.add_argument("--thresholds", default="", help="one per class, comma-separated or JSON; null = none")
    p.add_argument("--calibrate-on", default="", help="manifest whose val split calibrates the thresholds")
    p.add_argument("--min-val-positives", type=positive_int, default=5,
                   help="validation positives a class needs for a calibrated threshold (fewer: none)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--registered-name", default="cxr-classifier")
    p.add_argument("--experiment", default=EXPERIMENTS["train_classifier"])
    return p


def parse_args(argv: Sequence[str] | None = None) -> ImportConfig:
    """Parse and validate; any bad value exits with status 2 and a message naming it."""
    p = build_parser()
    a = p.parse_args(argv)
    weights = a.weights.strip() or None
    if weights and not Path(weights).expanduser().is_file():
        p.error(f"argument --weights: file not found: {Path(weights).expanduser().resolve()} "
                "(weights are never downloaded; pass a local file or '')")
    try:
        kwargs = json.loads(a.model_kwargs or "{}")
    except json.JSONDecodeError as exc:
        p.error(f"argument --model-kwargs: not JSON ({exc.msg}): {a.model_kwargs!r}")
    if not isinstance(kwargs, dict):
        p.error(f"argument --model-kwargs: expected a JSON object, got {a.model_kwargs!r}")
    text = a.classes.strip()
    classes = None
    if text:
        try:
            classes = json.loads(text) if text.startswith("[") else [c.strip() for c in text.split(",")]
        except json.JSONDecodeError:
            p.error(f"argument --classes: not a JSON list: {text!r}")
        if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
            p.error(f"argument --classes: expected non-empty names, got {text!r}")
    try:
        scale = _floats(a.scale, "--scale")
        mean, std = _floats(a.mean, "--mean"), _floats(a.std, "--std")
        thresholds = _floats(a.thresholds, "--thresholds", allow_null=True)
    except argparse.ArgumentTypeError as exc:
        p.error(f"argument {exc}")
    if scale is not None and len(scale) != 2:
        p.error(f"argument --scale: expected lo,hi, got {a.scale!r}")
    if thresholds is not None:
        if a.calibrate_on.strip():
            p.error("arguments --thresholds and --calibrate-on: give one of them")
        if any(math.isfinite(t) and not 0 < t < 1 for t in thresholds):
            p.error(f"argument --thresholds: probabilities in (0, 1) or null, got {a.thresholds!r}")
        if classes is not None and len(thresholds) != len(classes):
            p.error(f"argument --thresholds: {len(thresholds)} values for {len(classes)} classes")
    calibrate = None
    if a.calibrate_on.strip():
        try:
            calibrate = str(manifest_arg(a.calibrate_on.strip()))
        except argparse.ArgumentTypeError as exc:
            p.error(f"argument --calibrate-on: {exc}")
    if not a.registered_name.strip():
        p.error("argument --registered-name: must not be empty")
    return ImportConfig(source=a.source.strip(), weights=str(Path(weights).expanduser().resolve()) if weights else None,
                        classes=[c.strip() for c in classes] if classes else None, image_size=a.image_size,
                        channels=int(a.channels) if a.channels else None, scale=scale, mean=mean, std=std,
                        outputs=a.outputs, feature_layer=a.feature_layer.strip() or None, model_kwargs=kwargs,
                        thresholds=thresholds, calibrate_on=calibrate, min_val_positives=a.min_val_positives,
                        batch_size=a.batch_size, registered_name=a.registered_name.strip(), experiment=a.experiment)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the entry point; returns the registered model version."""
    quiet_console()
    import mlflow

    from mlflow_projects.pyfunc_classifier import log_classifier_model, model_meta
    from training.export import export_onnx
    from training.imported import calibrate_thresholds, import_model

    cfg = parse_args(argv)
    # every check before anything is written: the model is built, loaded and wrapped here
    model = import_model(cfg.source, weights=cfg.weights, classes=cfg.classes, image_size=cfg.image_size,
                         channels=cfg.channels, scale=cfg.scale, mean=cfg.mean, std=cfg.std, outputs=cfg.outputs,
                         feature_layer=cfg.feature_layer, model_kwargs=cfg.model_kwargs)
    if cfg.thresholds is not None:
        if len(cfg.thresholds) != model.num_classes:
            raise ValueError(f"--thresholds gives {len(cfg.thresholds)} values for the model's {model.num_classes} "
                             f"classes {model.class_names}")
        model.thresholds = list(cfg.thresholds)
    calibration = None
    if cfg.calibrate_on:
        calibration = calibrate_thresholds(model, cfg.calibrate_on, min_positives=cfg.min_val_positives,
                                           batch_size=cfg.batch_size)
    with start_run(cfg.experiment, run_name=f"import_classifier-{model.arch}") as run, \
            tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        log_config(cfg)
        mlflow.set_tags({"source": cfg.source, "classes": ",".join(model.class_names), "task": "multilabel"})
        if calibration is not None:
            mlflow.log_dict(calibration, "data/calibration.json")
        (tmp / "onnx").mkdir()
        try:
            onnx_file = export_onnx(model, tmp / "onnx" / "model.onnx")
        except Exception as exc:  # noqa: BLE001 - the service serves it with torch instead
            log.warning("%s does not export to ONNX (%s: %s); registered without model.onnx (served with torch)",
                        model.arch, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            onnx_file = None
        info = log_classifier_model(model, onnx=onnx_file is not None)
        if onnx_file is not None:
            mlflow.log_artifact(str(onnx_file), "onnx")
        meta = model_meta(model)
        tags = {"classes": meta["classes"], "thresholds": meta["thresholds"],
                "threshold_positives": meta["threshold_positives"], "min_val_positives": meta["min_val_positives"],
                "input": meta["input"], "arch": model.arch, "task": "multilabel", "feature_layer": meta["feature_layer"],
                "head": meta["head"], "source": cfg.source, "onnx": onnx_file is not None,
                "import_run_id": run.info.run_id}
        mv = register_version(info.model_uri, cfg.registered_name, tags,
                              description=f"imported {cfg.source} ({model.num_classes} classes, {cfg.image_size} px, "
                                          f"head {meta['head']})")
        mlflow.set_tag("registered_version", f"{cfg.registered_name}/{mv.version}")
    print(f"{cfg.registered_name} version {mv.version} (@candidate): imported {cfg.source}; "
          f"{model.num_classes} classes; feature layer {model.feature_layer}; head {model.head_kind}; "
          f"ONNX {'yes' if onnx_file is not None else 'no (torch path)'}; thresholds "
          f"{sum(math.isfinite(t) for t in model.thresholds)}/{model.num_classes}")
    return str(mv.version)


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "import_classifier"))
