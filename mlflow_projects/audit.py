"""MLflow entry point ``audit``: the interpretation suite on a probing set, logged as one audit run.

    python -m mlflow_projects.audit --model-uri models:/cxr-classifier/3 --data MANIFEST [--reports FILE]
    python -m mlflow_projects.audit --resume FOLDER      # log an audit computed while the server was down

Thin glue: it parses the options, resolves the registry URIs (the model, the CLIP, the champion's audit
to compare with), calls :func:`interpret.audit.run_audit` (every section, the report and the gates live
there) and logs the folder it wrote. Everything is first written to a local folder (``--out``, default
``outputs/audits/<stamp>-<model>``): the ``audit/`` artifacts and ``audit_state.json`` (what to log and
where). Then one MLflow run logs params, metrics and the ``audit/`` folder; the run is tagged with the
model name/version and the model version gets tags ``audit.run_id``, ``audit.status``, ``audit.summary``
and ``audit.unfit_classes`` (JSON list of the classes whose explanations the audit found unfit). The run
also holds the version's model card (``audit/model_card.md`` and ``.html``, :mod:`interpret.audit.model_card`),
linked from the version's description. If the tracking server cannot be reached at that point, the folder stays, the command
says where and exits with status 75 (EX_TEMPFAIL); ``--resume FOLDER`` logs it later without recomputing
anything. Bad input (unknown model, version or alias, missing manifest, gates or reports file, a CLIP that
cannot be resolved) exits with status 2 and one line saying what is wrong, before anything is written.
A registered ``cxr-dwarf`` version is audited like a classifier (its refined maps; the unit sections are
skipped). By default a failed gate is logged and the command exits 0 (``promote`` enforces the gates);
``--fail-on-gates`` makes it exit 1 instead, for CI pipelines. ``--device`` (``-P device=`` in MLproject) chooses
where torch runs: ``auto`` (default: CUDA when torch sees one, else the CPU; ``$CXR_TORCH_DEVICE`` overrides, as in
the service), ``cpu``, ``cuda`` or ``cuda:N``; anything else, or CUDA where there is none, exits 2 naming the forms.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from interpret.audit import ANNOTATION_METHODS, ATTENTION_METHODS, SCHEMA_VERSION, AuditConfig, load_gates, run_audit
from mlflow_projects.common import (CHAMPION, DEFAULT_GATES, DEFAULT_TRACKING_URI, ModelIdentity, RegistryError,
                                    check_manifest, choice_of, entry_parser, load_audit_model, log_config,
                                    nonneg_float, nonneg_int, positive_int, resolve_clip, resolve_model_uri,
                                    setup_tracking, to_tag, unit_float, version_audit, card_facts, link_card,
                                    write_card)

log = logging.getLogger(__name__)

DEFAULT_DATA = "outputs/phantom/manifest.parquet"
DEFAULT_MODEL_URI = "models:/cxr-classifier@candidate"
DEFAULT_CLIP = "models:/cxr-clip@candidate"
EXPERIMENT = "cxr-audit"
ARTIFACT_DIR = "audit"
STATE_FILE = "audit_state.json"
EX_TEMPFAIL = 75
EX_USAGE = 2
EX_GATES = 1  # --fail-on-gates and a gate failed


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server could not be reached while logging."""


def reproduce_command(cfg: AuditConfig, model_uri: str) -> str:
    """The command line that recomputes this audit (shown in the report)."""
    args = ["python", "-m", "mlflow_projects.audit", "--model-uri", model_uri, "--data", cfg.data,
            "--clip", cfg.clip, "--method", cfg.method, "--gates", str(cfg.gates), "--split", cfg.split,
            "--max-images", str(cfg.max_images), "--attention", cfg.attention, "--seed", str(cfg.seed)]
    if cfg.reports:
        args += ["--reports", cfg.reports]
    if cfg.image_size:
        args += ["--image-size", str(cfg.image_size)]
    if cfg.pointing_tolerance is not None:
        args += ["--pointing-tolerance", str(cfg.pointing_tolerance)]
    if cfg.device != "auto":
        args += ["--device", cfg.device]
    return " ".join(shlex.quote(a) for a in args)




def device_arg(text: str) -> str:
    """argparse type of ``--device``: one of auto, cpu, cuda, cuda:N (:func:`interpret.devices.check_device_spec`)."""
    from interpret.devices import check_device_spec

    try:
        return check_device_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def champion_baseline(ident: ModelIdentity) -> tuple[tuple[dict, str] | None, str]:
    """The latest audit of the registered model's ``champion`` to compare with, or None and why not."""
    if not ident.name:
        return None, "the audited model is not a registered version"
    try:
        other = version_audit(ident.name, alias=CHAMPION)
    except RegistryError as exc:
        return None, str(exc)
    version = str(other.get("model", {}).get("version"))
    if version == str(ident.version):
        return None, f"this version is the current @{CHAMPION}"
    return (other, f"@{CHAMPION} v{version}"), ""


def _default_out(ident: ModelIdentity) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = f"{ident.name}-v{ident.version}" if ident.name else "model"
    return Path("outputs") / "audits" / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}"


@dataclass
class Resolved:
    """The inputs of an audit, checked and resolved."""

    gates: list
    manifest: Path
    ident: ModelIdentity
    clip: tuple[Any, str]
    baseline: tuple[dict, str] | None
    baseline_note: str


def resolve_inputs(cfg: AuditConfig) -> Resolved:
    """Check and resolve every input before anything is downloaded or written.

    Raises:
        FileNotFoundError: the manifest, reports or gates file does not exist (names the path).
        ValueError: a malformed gates file; RegistryError (a ValueError): the model or CLIP URI cannot be
            resolved (lists the valid names, versions or aliases).
    """
    from interpret.devices import resolve_torch_device

    resolve_torch_device(cfg.device)  # CUDA asked for where there is none: refused before anything is loaded
    gates = load_gates(cfg.gates)  # fail early on a missing or bad gates file
    manifest = Path(check_manifest(cfg.data, default=""))  # missing, a folder or not Parquet: refused
    if cfg.reports and not Path(cfg.reports).is_file():
        raise FileNotFoundError(f"reports file not found: {Path(cfg.reports).resolve()}")
    ident = resolve_model_uri(cfg.model_uri, fallback=False)  # audit exactly the version named
    import torch

    torch.manual_seed(cfg.seed)  # an untrained CLIP ('scratch') is initialised the same way on every run
    clip = resolve_clip(cfg.clip)
    baseline, note = champion_baseline(ident)
    return Resolved(gates, manifest, ident, clip, baseline, note)


def compute_audit(cfg: AuditConfig, resolved: Resolved | None = None) -> Path:
    """Run the audit engine on the resolved inputs and write the audit folder (nothing is logged here).

    Returns:
        The folder; its ``audit/`` subfolder holds the artifacts, ``audit_state.json`` what to log.
    """
    import mlflow

    r = resolved or resolve_inputs(cfg)
    ident = r.ident
    with tempfile.TemporaryDirectory() as tmp:
        model, meta = load_audit_model(ident.uri, Path(tmp))
    folder = Path(cfg.out) if cfg.out else _default_out(ident)
    art = folder / ARTIFACT_DIR
    info = {"uri": ident.uri, "requested_uri": cfg.model_uri, "name": ident.name, "version": ident.version,
            "run_id": ident.run_id}
    summary = run_audit(cfg, model, r.manifest, art, model_info=info, meta=meta, clip=r.clip, gates=r.gates,
                        baseline=r.baseline, baseline_note=r.baseline_note,
                        reproduce=reproduce_command(cfg, ident.uri))
    state = {"schema_version": SCHEMA_VERSION, "tracking_uri": mlflow.get_tracking_uri(),
             "experiment": cfg.experiment, "model": info, "run_id": None, "logged": False}
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    log.info("audit of %s: %s; files in %s", ident.uri, summary["status"], folder.resolve())
    return folder


# ---- logging to MLflow -----------------------------------------------------------------------
def tracking_reachable() -> bool:
    """Whether the current tracking store answers a trivial query."""
    from mlflow import MlflowClient

    try:
        MlflowClient().search_experiments(max_results=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


def publish_audit(folder: str | Path) -> str:
    """Log an audit folder as one MLflow run and tag the model version (idempotent: a run created by an
    earlier, interrupted attempt is reused).

    Returns:
        The audit run id.

    Raises:
        TrackingUnavailable: the tracking server could not be reached (the folder is left as is).
    """
    import mlflow
    from mlflow import MlflowClient

    from interpret.audit.diff import upgrade_summary
    from interpret.audit.gates import GateResult, short_summary

    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder} is not an audit folder ({STATE_FILE} missing)")
    state = json.loads(state_path.read_text())
    # an audit computed by an older version is logged under today's names (cos_clip -> cos_vlm)
    summary = upgrade_summary(json.loads((folder / ARTIFACT_DIR / "summary.json").read_text()))
    if state.get("logged"):
        log.info("audit in %s was already logged as run %s", folder, state["run_id"])
        return state["run_id"]
    if not os.environ.get("MLFLOW_TRACKING_URI") and state.get("tracking_uri"):
        os.environ["MLFLOW_TRACKING_URI"] = state["tracking_uri"]
    try:
        exp_id = setup_tracking(state.get("experiment") or EXPERIMENT)
        client = MlflowClient()
        run_id = state.get("run_id")
        if run_id:
            try:
                client.get_run(run_id)
            except Exception:  # noqa: BLE001 - the earlier run vanished: start a new one
                run_id = None
        model = state["model"]
        results = [GateResult(**r) for r in summary["gates"]["results"]]
        text = short_summary(summary, results)
        name = f"audit {model['name']} v{model['version']}" if model.get("name") else "audit"
        with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                              run_name=None if run_id else name) as run:
            run_id = run.info.run_id
            state["run_id"] = run_id
            state_path.write_text(json.dumps(state, indent=1))
            cfg = summary.get("config", {})
            log_config(cfg)  # the shared way: no clash with the params `mlflow run` logged
            mlflow.log_metrics(summary.get("metrics", {}))
            tags = {"audit.status": summary["status"], "model.uri": model["uri"],
                    "data.manifest": summary["data"]["manifest"], "data.fingerprint": summary["data"]["fingerprint"],
                    "mlflow.note.content": text}
            if model.get("name"):
                tags.update({"model.name": model["name"], "model.version": str(model["version"])})
            mlflow.set_tags(tags)
            # the model card needs the audit run's id (and the registry's facts): written here, logged with the rest
            write_card(summary, folder / ARTIFACT_DIR, card_facts(summary, run_id, client))
            mlflow.log_artifacts(str(folder / ARTIFACT_DIR), ARTIFACT_DIR)
        if model.get("name"):
            for key, value in {"audit.run_id": run_id, "audit.status": summary["status"],
                               "audit.summary": text,
                               "audit.unfit_classes": json.dumps(summary.get("unfit_classes", []))}.items():
                client.set_model_version_tag(model["name"], model["version"], key, to_tag(value))
            link_card(client, model["name"], model["version"], run_id, ARTIFACT_DIR)
    except Exception as exc:
        if isinstance(exc, (FileNotFoundError, KeyError)) or tracking_reachable():
            raise
        raise TrackingUnavailable(f"could not reach the MLflow tracking server at {mlflow.get_tracking_uri()}: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    state["logged"] = True
    state_path.write_text(json.dumps(state, indent=1))
    log.info("audit logged as run %s%s", run_id,
             f"; {model['name']} version {model['version']} tagged audit.status={summary['status']}"
             if model.get("name") else "")
    return run_id


# ---- entry point -----------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> tuple[AuditConfig, str, bool]:
    p = entry_parser("audit", __doc__)
    p.add_argument("--resume", default="", metavar="FOLDER",
                   help="log an audit folder written while the tracking server was unreachable; nothing is recomputed")
    p.add_argument("--model-uri", default=DEFAULT_MODEL_URI,
                   help="models:/NAME/VERSION or models:/NAME@ALIAS of a registered cxr-classifier, or a model folder")
    p.add_argument("--data", default=DEFAULT_DATA, help="manifest of the probing set")
    p.add_argument("--reports", default="", help="text file of reports, one a line (default: the manifest's)")
    p.add_argument("--clip", default=DEFAULT_CLIP,
                   help="models:/ URI of a cxr-clip, an open_clip spec, or 'scratch' (an untrained CLIP, asked for by name)")
    p.add_argument("--method", type=choice_of(ANNOTATION_METHODS, "annotation method"), default="mammi")
    p.add_argument("--gates", default=DEFAULT_GATES, help="gates YAML file (the promotion policy)")
    p.add_argument("--split", type=choice_of(("all", "train", "val", "test"), "split"), default="test")
    p.add_argument("--max-images", type=positive_int, default=400)
    p.add_argument("--image-size", type=nonneg_int, default=0, help="0 = the model's input size")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--attention", type=choice_of(ATTENTION_METHODS, "attention method"), default="auto",
                   help="the attention method audited (auto: cam for a classifier, dwarf for a DWARF model)")
    p.add_argument("--pointing-tolerance", type=nonneg_float, default=None, metavar="PX",
                   help="pointing-game tolerance in probe pixels (default: 15 px at 224 px, scaled)")
    p.add_argument("--penultimate-layer", default="")
    p.add_argument("--dissection-quantile", type=unit_float, default=0.0, help="0 = by architecture")
    p.add_argument("--alpha", type=unit_float, default=0.93)
    p.add_argument("--beta", type=unit_float, default=0.95)
    p.add_argument("--top-units", type=positive_int, default=5)
    p.add_argument("--gallery-n", type=nonneg_int, default=2)
    p.add_argument("--max-concepts", type=positive_int, default=200)
    p.add_argument("--outside-threshold", type=unit_float, default=0.5)
    p.add_argument("--marker-threshold", type=unit_float, default=0.2)
    p.add_argument("--min-evidence", type=positive_int, default=10,
                   help="representative images a unit annotation needs to be served")
    p.add_argument("--min-images", type=positive_int, default=10, help="mammi_floor: representatives per unit at least")
    p.add_argument("--dissection-min-cells", type=positive_int, default=7,
                   help="dissection runs only on feature maps with at least this many cells a side")
    p.add_argument("--faithfulness-metrics", default="deletion,insertion",
                   help="comma-separated: deletion, insertion (gated), road_morf, road_lerf (ROAD, reported only)")
    p.add_argument("--faithfulness-steps", type=positive_int, default=10)
    p.add_argument("--faithfulness-baseline", type=choice_of(("blur", "mean", "zero"), "baseline"), default="blur")
    p.add_argument("--faithfulness-max-per-class", type=nonneg_int, default=20,
                   help="positive images per class in the faithfulness curves (0 = all)")
    p.add_argument("--road-max-per-class", type=nonneg_int, default=5,
                   help="positive images per class in the ROAD curves (0 = all; reported, not gated)")
    p.add_argument("--faithfulness-batch-size", type=positive_int, default=128,
                   help="perturbed images per forward pass of the faithfulness curves")
    p.add_argument("--sanity-images", type=nonneg_int, default=16, help="images of the randomisation test (0 = not run)")
    p.add_argument("--min-cases", type=positive_int, default=5,
                   help="images a verdict criterion needs; fewer and the class is unfit (not checkable)")
    p.add_argument("--min-faithfulness-gain", type=nonneg_float, default=0.01,
                   help="lower CI bound the deletion and insertion AUC gains over a random order must exceed")
    p.add_argument("--n-bootstrap", type=positive_int, default=1000, help="bootstrap resamples of every CI")
    p.add_argument("--ood-false-alarm", type=unit_float, default=0.05,
                   help="target false-alarm rate of the out-of-distribution warning on in-distribution images")
    p.add_argument("--fail-on-gates", nargs="?", const="true", default="false",
                   type=choice_of(("true", "false"), "--fail-on-gates value"),
                   help="exit 1 when a gate fails (default false: log the failed audit and exit 0)")
    p.add_argument("--out", default="", help="local audit folder (default outputs/audits/<stamp>-<model>)")
    p.add_argument("--experiment", default=EXPERIMENT)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", type=device_arg, default="auto",
                   help="torch device: auto (CUDA when torch sees one, else cpu; $CXR_TORCH_DEVICE overrides), cpu, "
                        "cuda or cuda:N")
    a = vars(p.parse_args(argv))
    resume = a.pop("resume")
    fail_on_gates = a.pop("fail_on_gates") == "true"
    try:
        from interpret.faithfulness import FAITHFULNESS_METRICS

        bad = [m for m in a["faithfulness_metrics"].split(",") if m.strip() not in FAITHFULNESS_METRICS]
        if bad:
            p.error(f"unknown faithfulness metric(s) {bad}; valid: {', '.join(FAITHFULNESS_METRICS)}")
    except ImportError:  # pragma: no cover
        pass
    return AuditConfig(**a), resume, fail_on_gates


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) an audit; returns the exit status: 0 logged, 75 computed but not logged."""
    import mlflow

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg, resume, fail_on_gates = parse_args(argv)
    if resume:
        folder = Path(resume)
        if os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    else:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
        try:
            resolved = resolve_inputs(cfg)
        except (FileNotFoundError, ValueError) as exc:  # RegistryError is a ValueError
            print(f"audit: error: {exc}", file=sys.stderr)
            return EX_USAGE
        try:
            folder = compute_audit(cfg, resolved)
        except ValueError as exc:  # a method that does not apply to the model's kind (known once it is loaded)
            print(f"audit: error: {exc}", file=sys.stderr)
            return EX_USAGE
    try:
        run_id = publish_audit(folder)
    except FileNotFoundError as exc:  # --resume of a folder that is not an audit folder
        print(f"audit: error: {exc}", file=sys.stderr)
        return EX_USAGE
    except TrackingUnavailable as exc:
        log.error("%s\nThe audit is complete and saved in %s (report: %s).\nLog it later with:\n"
                  "  python -m mlflow_projects.audit --resume %s", exc, folder.resolve(),
                  (folder / ARTIFACT_DIR / "report.html").resolve(), shlex.quote(str(folder.resolve())))
        return EX_TEMPFAIL
    log.info("audit run %s; report %s", run_id, (folder / ARTIFACT_DIR / "report.html").resolve())
    if fail_on_gates:
        status = json.loads((folder / ARTIFACT_DIR / "summary.json").read_text()).get("status")
        if status != "passed":
            print(f"audit: gates failed (--fail-on-gates); see {(folder / ARTIFACT_DIR / 'report.html').resolve()}",
                  file=sys.stderr)
            return EX_GATES
    return 0


if __name__ == "__main__":
    sys.exit(main())
