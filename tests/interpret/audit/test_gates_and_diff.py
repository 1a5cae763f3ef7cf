"""Gates and the version diff of the audit engine (pure functions, no MLflow)."""
from __future__ import annotations

import pytest

from interpret.audit import diff as compare
from interpret.audit import gates as promote
from mlflow_projects.common import DEFAULT_GATES


def test_parse_and_evaluate_gates():
    gates = promote.parse_gates({"gates": [{"name": "auc", "metric": "auroc_mean", "min": 0.7},
                                           {"metric": "shortcut_class_fraction", "max": 0.2},
                                           {"metric": "pointing_mean", "min": 0.5, "optional": True}]})
    res = promote.evaluate_gates({"auroc_mean": 0.8, "shortcut_class_fraction": 0.5}, gates)
    assert [r.status for r in res] == ["passed", "failed", "skipped"]
    assert not promote.gates_passed(res)
    assert promote.gates_passed(promote.evaluate_gates({"auroc_mean": 0.7, "shortcut_class_fraction": 0.2}, gates))
    assert promote.evaluate_gates({"auroc_mean": float("nan")}, gates[:1])[0].status == "failed"


@pytest.mark.parametrize("bad, match", [({"gates": [{"metric": "x"}]}, "needs 'min' or 'max'"),
                                        ({"gates": [{"metric": "x", "min": 1, "mni": 2}]}, "unknown keys"),
                                        ({"gates": [{"metric": "x", "min": "high"}]}, "must be a number"),
                                        ({"gate": []}, "list under 'gates'")])
def test_bad_gates_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        promote.parse_gates(bad)


def test_default_gates_file_is_valid():
    names = [g.metric for g in promote.load_gates(DEFAULT_GATES)]
    assert {"auroc_mean", "iobb_mean", "concept_coverage"} <= set(names)


def _summary(version, auroc, iobb, concepts):
    return {"model": {"name": "cxr-classifier", "version": version}, "status": "passed",
            "metrics": {"auroc_mean": auroc, "iobb_mean": iobb},
            "localization": {"per_class": [{"class": "Effusion", "iobb": iobb, "ior": 0.1, "pointing": 0.5}]},
            "importance": {"per_class": {"Effusion": [{"unit": 1, "concepts": concepts}]}}}


def test_compare_summaries_metrics_concepts_localization():
    a = _summary("1", 0.7, 0.2, ["effusion", "rib"])
    b = _summary("2", 0.8, 0.35, ["effusion", "costophrenic angle"])
    cmp = compare.compare_summaries(a, b, "v1", "v2")
    auc = next(r for r in cmp["metrics"] if r["metric"] == "auroc_mean")
    assert auc["a"] == 0.7 and auc["b"] == 0.8 and auc["delta"] == pytest.approx(0.1)
    (row,) = cmp["concepts"]
    assert row == {"class": "Effusion", "gained": ["costophrenic angle"], "lost": ["rib"], "kept": ["effusion"]}
    (loc,) = cmp["localization"]
    assert loc["iobb_delta"] == pytest.approx(0.15)
    text = compare.comparison_text(cmp)
    assert "gained: costophrenic angle; lost: rib" in text
    assert "<h2>Comparison" in compare.comparison_html(cmp)
