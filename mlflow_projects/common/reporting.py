"""Logging a run's configuration, metrics and tables; printing results."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import mlflow
from mlflow import MlflowClient

log = logging.getLogger("mlflow_projects.common")


def _param_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def log_config(config: Any, name: str = "config.json") -> None:
    """Log a resolved configuration (dataclass or mapping) as params and as the artifact ``config.json``.

    The one way every entry point logs its parameters. Under ``mlflow run`` the launcher has already
    logged the MLproject parameters as given (``reports=''``, a relative ``data``); MLflow refuses to
    change a param, so a value the launcher logged differently is logged as ``resolved.<key>`` and one it
    logged identically is not logged again. The artifact always holds the whole resolved config.
    """
    from dataclasses import asdict, is_dataclass

    data = asdict(config) if is_dataclass(config) else dict(config)
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params if run else {}
    params = {}
    for key, value in data.items():
        text = _param_text(value)
        if key not in existing:
            params[key] = text
        elif existing[key] != text:
            params[f"resolved.{key}"] = text
    if params:
        mlflow.log_params(params)
    mlflow.log_dict(json.loads(json.dumps(data, default=str)), name)


def finite_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Metric dict without NaN/inf or non-numbers (MLflow rejects them), names prefixed."""
    import math

    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not hasattr(value, "__float__"):
            continue
        value = float(value)
        if math.isfinite(value):
            out[f"{prefix}{key}"] = value
    return out


def print_table(table, title: str = "", file=None) -> None:
    """Write a results table (a DataFrame) to stdout: the final answer of a study, after the log lines
    (which go to stderr)."""
    import sys

    out = file or sys.stdout
    if title:
        out.write(f"{title}\n")
    out.write(("(no rows)" if table is None or len(table) == 0 else
               table.to_string(index=False, float_format=lambda v: f"{v:.3f}")) + "\n")
    out.flush()


def log_table(table, folder: Path, name: str, title: str, artifact_path: str) -> None:
    """Log a results table as ``<artifact_path>/<name>.csv`` and ``.html`` (with ``title``)."""
    table.to_csv(folder / f"{name}.csv", index=False)
    (folder / f"{name}.html").write_text(f"<h2>{title}</h2>" + table.to_html(index=False, float_format="%.4f"))
    for ext in ("csv", "html"):
        mlflow.log_artifact(str(folder / f"{name}.{ext}"), artifact_path)


def table_metrics(table, prefix: str) -> dict[str, float]:
    """``{prefix}{metric}.{class}`` for the metric columns of a per-class table (finite only)."""
    from training.metrics import METRIC_COLUMNS

    return finite_metrics({f"{col}.{cls}": row[col] for cls, row in table.iterrows() for col in METRIC_COLUMNS},
                          prefix)


