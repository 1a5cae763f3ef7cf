"""The audit engine on a DWARF model (its refined maps): performance, localisation, faithfulness, sanity and
per-disease verdicts; the sections that need a GAP + linear head are skipped with the reason."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from interpret.audit import AuditConfig, run_audit
from tests.training.dwarf_helpers import CLASSES, tiny_bundle


@pytest.mark.slow
def test_run_audit_covers_a_dwarf_model(tmp_path, tiny_phantom):
    from interpret.models import DwarfClassifierView
    from training.dwarf.model import build_dwarf

    torch.manual_seed(0)
    dwarf = build_dwarf(tiny_bundle(), CLASSES, d_model=32, heads=2).eval()
    cfg = AuditConfig(split="all", max_images=24, gallery_n=1, data=str(tiny_phantom), sanity_images=4,
                      faithfulness_steps=4, n_bootstrap=200)
    out = tmp_path / "audit"
    summary = run_audit(cfg, dwarf, tiny_phantom, out, model_info={"uri": "constructed"}, clip=None)
    assert summary["model"]["kind"] == "dwarf" and summary["config"]["attention"] == "dwarf"
    sec = summary["sections"]
    for name in ("performance", "faithfulness", "sanity"):
        assert sec[name]["status"] == "ok", (name, sec[name])
    for name in ("dissection", "concepts", "importance", "ood"):
        assert sec[name]["status"] == "skipped" and "DWARF" in sec[name]["reason"], (name, sec[name])
    assert [v["class"] for v in summary["verdicts"]] == CLASSES
    faith = pd.read_parquet(out / "faithfulness.parquet")
    assert set(faith["method"]) == {"dwarf"} and set(faith["class"]) <= set(CLASSES)
    sanity = pd.read_parquet(out / "sanity.parquet")
    # the head and final decoder norm are computed after the maps: they are not randomised (said in the note)
    assert "cls_head" not in set(sanity["layer"]) and "cls_head" in summary["sanity"]["note"]
    assert json.loads((out / "summary.json").read_text())["unfit_classes"] == summary["unfit_classes"]
    # a classifier method on a DWARF model is refused, naming the valid one
    with pytest.raises(ValueError, match="dwarf"):
        run_audit(AuditConfig(attention="cam", data=str(tiny_phantom)), DwarfClassifierView(dwarf), tiny_phantom,
                  tmp_path / "x", model_info={})
