"""The one shared glue module of the MLflow entry points (a package; import names from here).

Only glue lives here; the science is in :mod:`training` and :mod:`interpret`. This is the ONE home of:

- model references: :func:`parse_model_uri` (``models:/name/3``, ``models:/name@alias``),
  :func:`parse_version` (a CLI's bare ``3`` or ``@alias``), :class:`ModelIdentity` and
  :func:`resolve_model_uri` (with the ``@champion`` -> ``@candidate`` fallback);
- "the audit of a version": :func:`latest_audit`, :func:`version_audit` (its ``summary.json``) and
  :func:`find_passing_audit` (a :class:`PassingAudit`: its concept table, ``summary.json`` and ``ood.npz``,
  what the service serves);
- registering: :func:`register_version`.

Registry look-ups fail with :class:`RegistryError` (a ``ValueError``) whose one-line message names the
bad name, version or alias and lists the valid ones.

Modules: :mod:`~mlflow_projects.common.settings` (paths, defaults, experiments),
:mod:`~mlflow_projects.common.tracking` (store, experiments, runs, manifest checks),
:mod:`~mlflow_projects.common.cli` (argparse types, quiet console, one-line errors),
:mod:`~mlflow_projects.common.registry` (registering, model references, audits of versions),
:mod:`~mlflow_projects.common.reporting` (config, metrics and tables of a run),
:mod:`~mlflow_projects.common.models` (a registered classifier, the audited model, a CLIP by one rule),
:mod:`~mlflow_projects.common.classifier_run` (classifier training runs),
:mod:`~mlflow_projects.common.cards` (the model card's facts from the registry, writing and linking it). ``python -m
mlflow_projects.common setup`` creates the tracking store and the experiments.
"""
from __future__ import annotations

from mlflow_projects.common.settings import (CANDIDATE, CHAMPION, DEFAULT_ARTIFACT_ROOT, DEFAULT_DATA,
    DEFAULT_GATES, DEFAULT_TRACKING_URI, DWARF_MIN_IMAGE_SIZE, EXPERIMENTS, PROJECT_ROOT, SCRATCH_CLIP)
from mlflow_projects.common.tracking import (artifact_root, check_manifest, ensure_data, ensure_experiment,
    manifest_arg, setup_tracking, start_run, tracking_uri)
from mlflow_projects.common.cli import (ArgumentParser, choice_of, entry_parser, existing_file, int_at_least, nonneg_float, nonneg_int,
    positive_float, positive_int, quiet_console, quiet_third_party, run_cli, show_progress, unit_float)
from mlflow_projects.common.registry import (AuditNotFound, CONCEPTS_ARTIFACT, FALLBACK_ALIAS, ModelIdentity,
    PassingAudit, RegistryError, SUMMARY_ARTIFACT, find_passing_audit, get_version, latest_audit, parse_model_uri, parse_version,
    register_version, resolve_model_uri, to_tag, version_audit)
from mlflow_projects.common.reporting import (finite_metrics, log_config, log_table, print_table, table_metrics)
from mlflow_projects.common.models import (CLIP_SPECS, load_audit_model, load_classifier, resolve_clip)
from mlflow_projects.common.classifier_run import (ClassifierRunConfig, add_classifier_arguments,
    classifier_image_size, plot_roc, train_one)
from mlflow_projects.common.cards import card_facts, data_tags, keep_card_line, link_card, write_card

__all__ = [
    "ArgumentParser", "entry_parser",
    "AuditNotFound", "CANDIDATE", "CHAMPION", "CLIP_SPECS", "CONCEPTS_ARTIFACT", "ClassifierRunConfig",
    "DEFAULT_ARTIFACT_ROOT", "DEFAULT_DATA", "DEFAULT_GATES", "DEFAULT_TRACKING_URI", "DWARF_MIN_IMAGE_SIZE",
    "EXPERIMENTS", "FALLBACK_ALIAS", "ModelIdentity", "PROJECT_ROOT", "RegistryError", "SCRATCH_CLIP",
    "SUMMARY_ARTIFACT", "add_classifier_arguments", "artifact_root", "check_manifest", "choice_of",
    "classifier_image_size", "ensure_data", "ensure_experiment", "existing_file", "find_passing_audit", "PassingAudit",
    "finite_metrics", "get_version", "int_at_least", "latest_audit", "load_audit_model", "load_classifier",
    "log_config",
    "log_table", "manifest_arg", "nonneg_float", "nonneg_int", "parse_model_uri", "parse_version", "plot_roc",
    "positive_float", "positive_int", "print_table", "quiet_console", "quiet_third_party", "register_version",
    "resolve_clip", "resolve_model_uri", "run_cli", "setup_tracking", "show_progress", "start_run",
    "table_metrics", "to_tag", "tracking_uri", "train_one", "unit_float", "version_audit",
    "card_facts", "data_tags", "keep_card_line", "link_card", "write_card"]
