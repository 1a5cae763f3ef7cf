"""Per-class verdicts and per-class gates on cases whose answer is known.

- a model with a planted evidence region, explained by a map of that region: faithful (deletion AUC below the
  random order, insertion above), so the faithfulness criterion passes; the same model explained by the
  complement of the region fails it;
- a model whose maps ignore its weights (features = the image itself, positive GAP + linear head): fails the
  randomisation test;
- a class with too few positives or boxed images is unfit ("insufficient"), never fit by default;
- a per-class gate names the classes that fail it.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from interpret.audit.gates import Gate, evaluate_gates, verdict_metrics
from interpret.audit.verdicts import VerdictPolicy, class_verdicts, faithfulness_criterion, localisation_criterion

POLICY = VerdictPolicy(min_cases=5, n_resamples=500, seed=0)


class PlantedRegion(nn.Module):
    """logit_c = 40 * (mean of the image over a planted square) - 10: the square is the only evidence."""

    def __init__(self, size: int = 16):
        super().__init__()
        mask = torch.zeros(size, size)
        mask[4:10, 5:11] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        m = (x[:, 0] * self.mask).sum((1, 2)) / self.mask.sum()
        return (40 * m - 10)[:, None]


class WeightBlind(nn.Module):
    """Features are the image repeated over K channels; a GAP + linear head with positive weights. CAM =
    (sum of the class's weights) * image: identical after min-max whatever the weights are."""

    feature_layer = "features"

    def __init__(self, k: int = 4, classes: int = 2):
        super().__init__()
        self.k = k
        self.features = nn.Identity()
        self.head = nn.Linear(k, classes)
        with torch.no_grad():
            self.head.weight.uniform_(0.5, 1.0)
        self.class_names = [f"c{i}" for i in range(classes)]

    def forward_features(self, x):
        return self.features(x.repeat(1, self.k, 1, 1))

    def forward_head(self, f):
        return self.head(f.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = 0.2 * torch.rand(n, 1, size, size, generator=g)
    x[:, :, 4:10, 5:11] += 0.7  # the finding, inside the planted region
    return x.clamp(0, 1)


def _faith_table(model, maps, n):
    from interpret.faithfulness import faithfulness

    x = _images(n)
    frames = []
    for metric in ("deletion", "insertion"):
        r = faithfulness(model, x, torch.zeros(n, 1, dtype=torch.long), maps, metric, steps=8, baseline="zero", seed=0)
        frames.append(r.to_frame([f"i{i}" for i in range(n)], ["Finding"]))
    return pd.concat(frames, ignore_index=True)


def test_faithful_map_of_the_planted_region_passes_and_its_complement_fails():
    model = PlantedRegion().eval()
    n = 12
    region = torch.zeros(n, 1, 16, 16)
    region[:, :, 4:10, 5:11] = 1.0
    region += 0.01 * torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))  # a strict order
    good = faithfulness_criterion(_faith_table(model, region, n), POLICY)
    assert good["status"] == "passed", good
    assert good["metrics"]["deletion"]["gain"]["low"] > 0 and good["metrics"]["insertion"]["gain"]["low"] > 0
    bad = faithfulness_criterion(_faith_table(model, 1.0 - region, n), POLICY)
    assert bad["status"] == "failed" and "no more faithful than a random order" in bad["reason"]


def test_weight_blind_maps_fail_the_randomisation_test_and_make_the_class_unfit():
    import copy

    from interpret.sanity import block_seed, model_randomisation, randomise_block_

    torch.manual_seed(0)
    model = WeightBlind(classes=4).eval()
    # the class whose re-drawn weights still sum positive: its CAM is the image itself before and after (a class
    # whose random weights sum negative is blanked by the ReLU, which changes the map: that is not this case)
    redrawn = randomise_block_(copy.deepcopy(model).head, block_seed(0, "head")).weight.sum(1)
    c = int(redrawn.argmax())
    assert redrawn[c] > 0
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    table = model_randomisation(model, x, torch.full((6, 1), c, dtype=torch.long), "cam", layers=["head"], seed=0)
    table["class"] = "c0"
    v = class_verdicts(["c0"], positives={"c0": 6}, sanity=table, policy=POLICY)[0]
    assert v["criteria"]["sanity"]["status"] == "failed"
    assert v["verdict"] == "unfit" and any("randomisation test" in r for r in v["reasons"])
    assert v["criteria"]["sanity"]["final_spearman"]["cam"]["estimate"] == pytest.approx(1.0)


def test_too_few_cases_is_unfit_and_no_positives_is_not_audited():
    loc = pd.DataFrame({"image_id": list("abc"), "class": "Mass", "pointing": [1.0, 1.0, 1.0],
                        "pointing_chance": [0.1, 0.1, 0.1]})
    crit = localisation_criterion(loc, POLICY)
    assert crit["status"] == "insufficient" and "3 boxed image(s) (< 5)" in crit["reason"]
    vs = class_verdicts(["Mass", "Hernia"], positives={"Mass": 3, "Hernia": 0}, localization=loc, policy=POLICY)
    assert [v["verdict"] for v in vs] == ["unfit", "unfit"]
    assert vs[1]["reasons"][0] == "not audited: no positive probing image of this class"
    assert vs[1]["criteria"]["localisation"]["status"] == "not_applicable"


def test_pointing_must_beat_chance_with_its_ci():
    rng = np.random.default_rng(0)
    hits = pd.DataFrame({"image_id": [f"i{i}" for i in range(30)], "class": "Nodule",
                         "pointing": (rng.random(30) < 0.9).astype(float), "pointing_chance": 0.1})
    assert localisation_criterion(hits, POLICY)["status"] == "passed"
    chance = hits.assign(pointing=(rng.random(30) < 0.1).astype(float))
    out = localisation_criterion(chance, POLICY)
    assert out["status"] == "failed" and out["lift"]["low"] <= 0 and "does not beat chance" in out["reason"]


def test_per_class_gate_names_the_failing_classes_and_reads_only_assessed_classes():
    summary = {"verdicts": [
        {"class": "A", "verdict": "fit", "criteria": {"localisation": {"status": "passed", "lift": {"low": 0.2}}}},
        {"class": "B", "verdict": "unfit", "criteria": {"localisation": {"status": "failed", "lift": {"low": -0.1}}}},
        {"class": "C", "verdict": "unfit", "criteria": {"localisation": {"status": "insufficient"}}},
        {"class": "D", "verdict": "fit", "criteria": {"localisation": {"status": "not_applicable"}}},
    ]}
    m = {k: v for k, v in verdict_metrics(summary).items() if v is not None}
    assert m["localisation_passed.A"] == 1 and m["localisation_passed.B"] == 0
    assert "localisation_passed.C" not in m and "localisation_passed.D" not in m
    assert m["fit_class_fraction"] == 0.5 and m["unfit_classes"] == 2
    gate = Gate("boxed", "localisation_passed", min=1, per_class=True)
    (r,) = evaluate_gates(m, [gate])
    assert r.status == "failed" and list(r.failed_classes) == ["B"] and "failed: B" in r.line()
    (ok,) = evaluate_gates({"localisation_passed.A": 1.0}, [gate])
    assert ok.status == "passed"
    (none,) = evaluate_gates({}, [gate])
    assert none.status == "failed"
    (opt,) = evaluate_gates({}, [Gate("boxed", "localisation_passed", min=1, per_class=True, optional=True)])
    assert opt.status == "skipped"


def test_gates_file_accepts_per_class_and_the_platform_policy_loads():
    from pathlib import Path

    from interpret.audit.gates import load_gates, parse_gates

    (g,) = parse_gates({"gates": [{"metric": "faithfulness_passed", "min": 1, "per_class": True}]})
    assert g.per_class and g.name == "faithfulness_passed"
    names = {g.name for g in load_gates(Path(__file__).resolve().parents[3] / "mlflow_projects" / "gates.yaml")}
    assert {"boxed_classes_beat_chance", "faithful_maps", "maps_depend_on_the_model"} <= names


def test_a_gain_that_is_merely_nonzero_is_not_evidence():
    """A model whose probability barely moves gives gains of 1e-5 with a CI above 0: not a faithful map."""
    rows = [{"image_id": f"i{i}", "class": "A", "metric": m, "auc": 0.5, "random_auc": 0.5, "gain": 1e-5 + 1e-7 * i}
            for i in range(10) for m in ("deletion", "insertion")]
    out = faithfulness_criterion(pd.DataFrame(rows), POLICY)
    assert out["metrics"]["deletion"]["gain"]["low"] > 0
    assert out["status"] == "failed" and "needs lower bound > 0.01" in out["reason"]
