"""The audit engine: probing set, sections, summary and flat metrics, gates, HTML report, version diff.

A plain library (no mlflow, no bentoml): :mod:`mlflow_projects.audit` resolves registry URIs, loads the
model and the CLIP, calls :func:`run_audit` and logs the folder it writes.

- :mod:`interpret.audit.probe`: the probing set (:func:`load_probe`).
- :mod:`interpret.audit.sections`: performance, attention/localisation, gallery, dissection, importance.
- :mod:`interpret.audit.concepts`: the concept section and the VLM check.
- :mod:`interpret.audit.shortcuts`: lung-field and marker estimates, shortcut warnings.
- :mod:`interpret.audit.gates`: gates files, :func:`flat_metrics`, :func:`evaluate_gates`.
- :mod:`interpret.audit.report`: the self-contained HTML report.
- :mod:`interpret.audit.diff`: the comparison of two summaries.
- :mod:`interpret.audit.engine`: :class:`AuditConfig` and :func:`run_audit`.
"""
from __future__ import annotations

from interpret.audit.diff import compare_summaries, comparison_html, comparison_text
from interpret.audit.engine import (ANNOTATION_METHODS, ATTENTION_METHODS, SCHEMA_VERSION, AuditConfig,
                                    explanation_rows, run_audit)
from interpret.audit.gates import (Gate, GateResult, evaluate_gates, flat_metrics, gates_passed, load_gates,
                                   parse_gates, short_summary)
from interpret.audit.probe import Probe, file_fingerprint, load_probe, penultimate_layer
from interpret.audit.report import build_report

__all__ = ["ANNOTATION_METHODS", "ATTENTION_METHODS", "SCHEMA_VERSION", "AuditConfig", "Gate", "GateResult",
           "Probe", "build_report", "compare_summaries", "comparison_html", "comparison_text", "evaluate_gates",
           "explanation_rows", "file_fingerprint", "flat_metrics", "gates_passed", "load_gates", "load_probe",
           "parse_gates", "penultimate_layer", "run_audit", "short_summary"]
