"""compare: version references and the side-by-side comparison of two audit summaries."""
from __future__ import annotations

import pytest

from mlflow_projects import compare


def _summary(version, auroc, iobb, concepts):
    return {"model": {"name": "cxr-classifier", "version": version}, "status": "passed",
            "metrics": {"auroc_mean": auroc, "iobb_mean": iobb},
            "localization": {"per_class": [{"class": "Effusion", "iobb": iobb, "ior": 0.1, "pointing": 0.5}]},
            "importance": {"per_class": {"Effusion": [{"unit": 1, "concepts": concepts}]}}}


def test_parse_ref_forms_and_errors():
    assert compare.parse_ref("cxr-classifier/3") == ("cxr-classifier", "3", None)
    assert compare.parse_ref("models:/cxr-classifier@champion") == ("cxr-classifier", None, "champion")
    with pytest.raises(ValueError, match="NAME/VERSION"):
        compare.parse_ref("cxr-classifier")


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
