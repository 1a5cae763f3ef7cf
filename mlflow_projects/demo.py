"""MLflow entry point ``demo`` (``make demo``): the whole system end to end on the phantom.

phantom -> train classifier -> train CLIP -> audit -> promote, each step running the other entry point as a
user would (``python -m mlflow_projects.<name> ...`` in a subprocess, its log lines passed through; the
versions it registered are read back from the registry), then prints where to look: the ``mlflow ui`` command, the audit report
and how to start the service (``--serve`` starts it in the background). Default sizes keep the whole
run near 11 minutes on a 2-core machine (642 s measured idle; the CLIP and the classifier take most).

    python -m mlflow_projects.demo --out outputs/demo [--serve]

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else the project's default SQLite store (the
one the service reads), with artifacts under ``CXR_ARTIFACT_ROOT`` (default ``mlartifacts/``).

Under ``mlflow run . -e demo`` every step still opens its own run in its own experiment (the launcher's
``MLFLOW_RUN_ID`` is not passed on: one run cannot hold the parameters of two trainings); the launcher's
run records what the demo produced (tags ``demo.*`` with the registered versions, the audit status and
whether the classifier was promoted; metrics ``time.<step>`` in seconds).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mlflow_projects.common import entry_parser, run_cli

log = logging.getLogger(__name__)

SERVICE_TARGET = "service:CXRExplainer"  # BentoML service class in service.py
#: Set by ``mlflow run`` for the launched command; a step must open its own run, not the demo's.
LAUNCHER_VARIABLES = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


@dataclass
class DemoResult:
    """What the demo produced (also printed)."""

    tracking_uri: str
    manifest: Path
    classifier_version: str
    clip_version: str
    audit_folder: Path
    audit_status: str
    promoted: bool
    timings: dict[str, float] = field(default_factory=dict)
    service_pid: int | None = None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from mlflow_projects.common import DEFAULT_GATES, nonneg_int, positive_int

    p = entry_parser("demo", __doc__)
    p.add_argument("--out", default="outputs/demo", help="folder for the phantom, audit folder and logs")
    # Defaults measured on the phantom (1000 images, seed 0, resnet18, 10 epochs, lr 1e-3). At 96 px: val mean AUROC
    # 0.736, but layer4 is 3x3 and its CAMs do not point at the findings (pointing game 0.085 vs chance 0.103 on the
    # test boxes). At 128 px (4x4 maps): val AUROC 0.774, pointing 0.302 vs chance 0.103, for about 1.2x the
    # training time per step. Fewer images or epochs leave the classifier near chance (400 images, 3 epochs, lr 4e-4:
    # 0.50) and the audit refuses promotion.
    p.add_argument("--n", type=positive_int, default=1000, help="phantom images")
    p.add_argument("--size", type=positive_int, default=128, help="phantom image side (px)")
    p.add_argument("--arch", default="resnet18", help="classifier architecture (train_classifier --arch)")
    p.add_argument("--epochs", type=positive_int, default=10, help="classifier epochs")
    p.add_argument("--lr", default="1e-3", help="classifier learning rate")
    p.add_argument("--image-size", type=positive_int, default=128, help="classifier input side")
    # CLIP: train_clip's default recipe (cxr-minilm-rn). On this phantom (700 train / 150 val pairs, seed 0; one run
    # each, on a shared machine): 30 epochs (139 s) val zero-shot AUROC 0.596 (contrast), recall@5 0.18; 60 epochs
    # (198 s) 0.670, recall@5 0.247 / 0.220 (chance 0.033).
    p.add_argument("--clip-epochs", type=positive_int, default=60, help="CLIP epochs (train_clip's default recipe)")
    p.add_argument("--clip-image-size", type=positive_int, default=64, help="CLIP input side")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the phantom and of both trainings")
    p.add_argument("--gates", default=str(DEFAULT_GATES), help="YAML of promotion thresholds")
    p.add_argument("--serve", action="store_true", help="start the service in the background at the end")
    p.add_argument("--port", type=positive_int, default=3000, help="service port (with --serve)")
    return p.parse_args(argv)


def _step(name: str, timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            log.info("demo: %s ...", name)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.t0, 1)
            if exc[0] is None:
                log.info("demo: %s done in %.1f s", name, timings[name])

    return _Timer()


def step_env() -> dict[str, str]:
    """The environment of a step: this process's (tracking store included) without the ``mlflow run``
    launcher's run and experiment (:data:`LAUNCHER_VARIABLES`)."""
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}


def run_step(module: str, args: Sequence[str]) -> int:
    """``python -m mlflow_projects.<module> args...`` with this interpreter, in the project folder, in
    :func:`step_env`; returns its exit status."""
    from mlflow_projects.common import PROJECT_ROOT

    cmd = [sys.executable, "-m", f"mlflow_projects.{module}", *map(str, args)]
    log.info("demo: %s", " ".join(shlex.quote(c) for c in cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=step_env(), check=False).returncode


def _registered(name: str, module: str, status: int) -> str:
    """The version ``module`` just registered (it holds alias ``candidate``)."""
    from mlflow_projects.common import resolve_model_uri

    if status != 0:
        raise RuntimeError(f"{module} exited with status {status}; see its messages above")
    return str(resolve_model_uri(f"models:/{name}@candidate").version)


def start_service(port: int, log_path: Path) -> subprocess.Popen:
    """``bentoml serve`` of the project's service in the background (output to ``log_path``)."""
    from mlflow_projects.common import PROJECT_ROOT

    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml) if bentoml.exists() else "bentoml", "serve", SERVICE_TARGET, "--port", str(port)]
    fh = open(log_path, "ab")
    return subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ),
                            start_new_session=True)


def run_demo(args: argparse.Namespace) -> DemoResult:
    """Run every step; raises when one fails (the message names the step)."""
    import json

    from mlflow_projects.common import SUMMARY_ARTIFACT, setup_tracking, tracking_uri
    from training.data.phantom import generate_phantom

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    setup_tracking("cxr-classifier")  # the store, with its artifacts under mlartifacts/
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with _step("phantom", timings):
        manifest = Path(generate_phantom(out / "phantom", n=args.n, size=args.size, seed=args.seed, masks=True))
    with _step("train classifier", timings):
        status = run_step("train_classifier", ["--data", manifest, "--arch", args.arch, "--epochs", args.epochs,
                                               "--lr", args.lr, "--image-size", args.image_size, "--seed", args.seed])
        cls_version = _registered("cxr-classifier", "train_classifier", status)
    with _step("train CLIP", timings):
        status = run_step("train_clip", ["--data", manifest, "--epochs", args.clip_epochs,
                                         "--image-size", args.clip_image_size, "--seed", args.seed])
        clip_version = _registered("cxr-clip", "train_clip", status)
    audit_folder = out / "audit"
    with _step("audit", timings):
        status = run_step("audit", ["--model-uri", f"models:/cxr-classifier/{cls_version}", "--data", manifest,
                                    "--clip", f"models:/cxr-clip/{clip_version}", "--gates", args.gates,
                                    "--out", audit_folder, "--seed", args.seed])
        if status != 0:
            raise RuntimeError(f"audit exited with status {status}; its files are in {audit_folder}")
    summary = json.loads((audit_folder / SUMMARY_ARTIFACT).read_text())
    with _step("promote", timings):
        promoted = run_step("promote", ["--name", "cxr-classifier", "--version", cls_version,
                                        "--gates", args.gates]) == 0
    timings["total"] = round(time.perf_counter() - t0, 1)
    result = DemoResult(uri, manifest, cls_version, clip_version, audit_folder, summary["status"], promoted, timings)
    if args.serve:
        result.service_pid = start_service(args.port, out / "service.log").pid
    return result


def record_in_launcher_run(result: DemoResult) -> str | None:
    """Under ``mlflow run`` (``MLFLOW_RUN_ID`` set), tag the launcher's run with what the demo produced and
    log the step timings as metrics ``time.<step>``; returns the run id (None outside ``mlflow run``)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    for key, value in {"demo.classifier": f"cxr-classifier/{result.classifier_version}",
                       "demo.clip": f"cxr-clip/{result.clip_version}", "demo.audit_status": result.audit_status,
                       "demo.promoted": str(result.promoted).lower(), "demo.audit_folder": str(result.audit_folder),
                       "demo.manifest": str(result.manifest)}.items():
        client.set_tag(run_id, key, value)
    for step, seconds in result.timings.items():
        client.log_metric(run_id, f"time.{step.replace(' ', '_')}", float(seconds))
    return run_id


def where_to_look(result: DemoResult, port: int) -> str:
    """The closing message: MLflow UI command, report path, service command."""
    uri = result.tracking_uri
    report = result.audit_folder / "audit" / "report.html"
    verdict = ("promoted to @champion" if result.promoted
               else "NOT promoted (gates failed; see the report)")
    lines = [
        "",
        "=" * 72,
        f"cxr-interpret demo finished in {result.timings.get('total', 0):.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result.timings.items() if k != 'total')})",
        f"  classifier: cxr-classifier version {result.classifier_version}, audit {result.audit_status}, {verdict}",
        f"  CLIP:       cxr-clip version {result.clip_version}",
        "",
        "MLflow UI (runs, registry, audit artifacts):",
        f"  mlflow ui --backend-store-uri {shlex.quote(uri)} --port 5000   # then open http://127.0.0.1:5000",
        "Audit report (self-contained HTML):",
        f"  {report}",
        "Model card (for compliance: what the model is, how it was audited, its limits; Markdown beside it):",
        f"  {Path(report).with_name('model_card.html')}",
        "Request records of the service (one line per /predict, /explain, /feedback; verify or export a period):",
        "  python -m mlflow_projects.serving.records verify --dir records",
        "Explanation service (serves @champion):" if result.promoted else
        "Explanation service (no @champion yet: serves @candidate, every response carries a warning):",
    ]
    if result.service_pid:
        lines.append(f"  started in the background (pid {result.service_pid}, log {result.audit_folder.parent / 'service.log'}): "
                     f"http://127.0.0.1:{port}  (stop with: kill {result.service_pid})")
    else:
        lines.append(f"  MLFLOW_TRACKING_URI={shlex.quote(uri)} .venv/bin/bentoml serve {SERVICE_TARGET} --port {port}")
    lines += ["Review page (open an image, judge and correct its explanations; boxes feed train_dwarf --feedback):",
              f"  http://127.0.0.1:{port}/ui/" + ("" if result.service_pid else "   (once the service runs)")]
    lines.append("=" * 72)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when every step ran (promotion refused still returns 0 and says so)."""
    from mlflow_projects.common import quiet_console

    quiet_console()  # first: third-party libraries read their settings when imported
    args = parse_args(argv)
    result = run_demo(args)
    record_in_launcher_run(result)
    sys.stdout.write(where_to_look(result, args.port) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "demo"))
