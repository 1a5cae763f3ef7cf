"""concept_benchmark: a planted known answer through ``run_benchmark``, and the entry point end to end on a real
MLflow store (artifacts, tags, one row per study / method)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from tests.mlflow_projects.audit_fixtures import register_tiny_classifier, tracking

DIM = 256


def _vec(text: str) -> torch.Tensor:
    """A fixed random unit vector per string (nearly orthogonal to every other string's in 256 dims)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = torch.randn(DIM, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


class OracleVLM:
    """A VLM that sees the findings: an image embeds as the sum of the vectors of its findings' concepts (plus
    a little image-specific noise); a prompt embeds as the vector of the concept it names."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, concept_of_class: list[str], prefix: str):
        self.images, self.prefix = images, prefix
        rows = []
        for i, y in enumerate(labels):
            v = 0.3 * _vec(f"image {i}") + sum((_vec(concept_of_class[c]) for c in np.flatnonzero(y)),
                                               torch.zeros(DIM))
            rows.append(v / v.norm())
        self.image_emb = torch.stack(rows)

    def encode_images(self, images):
        if images is self.images:  # the benchmark embeds the probing images, in order
            return self.image_emb
        # FALCON's crops (whole images under _whole_image_crops): each embeds as the probing image it is
        rows = [next(j for j in range(len(self.images)) if torch.equal(self.images[j], x)) for x in images]
        return self.image_emb[rows]

    def encode_texts(self, texts):
        out = []
        for t in texts:
            concept = t[len(self.prefix):].strip() if t.startswith(self.prefix) else t
            out.append(_vec(concept))
        return torch.stack(out)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A 300-image phantom probe restricted to the classes with >= 8 positives whose name (or synonym) is a
    single report noun (in both concept sets: MAMMI's nouns and the project's phrases), with units planted on
    them: unit c's logit is the label of class c, and its class activation map is the class's box mask."""
    from interpret.concepts import BASE_TEMPLATE, mammi_nouns, mine_concepts
    from interpret.evaluation import matches
    from interpret.audit.probe import load_probe
    from training.data.phantom import generate_phantom
    from training.data.schema import PHANTOM_CLASSES

    manifest = generate_phantom(tmp_path_factory.mktemp("ph"), n=300, size=64, seed=3)
    probe = load_probe(manifest, list(PHANTOM_CLASSES), 64, "all", 300)
    nouns = mine_concepts([r for r in probe.reports if r.strip()])
    single = set(mammi_nouns([r for r in probe.reports if r.strip()]))
    keep, concept_of_class = [], []
    for c, name in enumerate(probe.classes):
        hits = nouns[[matches(n, name) and n in single for n in nouns["concept"]]]
        if probe.labels[:, c].sum() >= 8 and len(hits):
            keep.append(c)
            concept_of_class.append(str(hits.sort_values("count", ascending=False)["concept"].iloc[0]))
    assert len(keep) >= 5, (probe.classes, probe.labels.sum(0))
    classes = [probe.classes[c] for c in keep]
    remap = {old: new for new, old in enumerate(keep)}
    box_labels = [np.array([remap[int(b)] for b in bl if int(b) in remap], dtype=np.int64) for bl in probe.box_labels]
    boxes = [np.asarray(bx)[[int(b) in remap for b in bl]].reshape(-1, 4) for bx, bl in zip(probe.boxes,
                                                                                            probe.box_labels)]
    probe = replace(probe, classes=classes, labels=probe.labels[:, keep], boxes=boxes, box_labels=box_labels)
    vlm = OracleVLM(probe.images, probe.labels, concept_of_class, prefix=BASE_TEMPLATE)
    return probe, vlm, concept_of_class


def _whole_image_crops(images, maps, acts, top_k=10, threshold=0.6):
    """FALCON's crops replaced by the whole top images (the oracle VLM knows what a whole image shows)."""
    idx = torch.topk(torch.as_tensor(acts), min(top_k, len(images)), dim=0).indices  # (k, U)
    return torch.stack([torch.stack([images[int(i)] for i in idx[:, u]]) for u in range(idx.shape[1])]), idx


@pytest.fixture(autouse=True)
def _oracle_crops(monkeypatch):
    from interpret.annotation import falcon

    monkeypatch.setattr(falcon, "activation_crops", _whole_image_crops)


def _planted_final_layer(probe):
    def final_layer(model, images, batch_size):
        g = torch.Generator().manual_seed(0)
        logits = torch.as_tensor(probe.labels, dtype=torch.float32) + 0.01 * torch.rand(probe.labels.shape, generator=g)
        cams = torch.zeros(len(probe.labels), len(probe.classes), probe.size, probe.size)
        for i, (bx, bl) in enumerate(zip(probe.boxes, probe.box_labels)):
            for (x0, y0, x1, y1), c in zip(bx, bl):
                cams[i, int(c), int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1.0
        return logits, cams + 0.01 * torch.rand(cams.shape, generator=g)
    return final_layer


def test_planted_units_are_named_by_every_method_that_can_see_them(planted, monkeypatch):
    from mlflow_projects import concept_benchmark as cb

    probe, vlm, concept_of_class = planted
    monkeypatch.setattr(cb, "final_layer", _planted_final_layer(probe))
    generic = ["house", "river", "music", "table", "window", "garden", "letter", "engine"]
    table = cb.run_benchmark(cb.BenchConfig(), model=None, probe=probe, vlm=vlm, generic=generic)

    rows = {(r.study, r.concept_set, r.method, r.setting): r for r in table.itertuples()}
    assert set(table["study"]) == {"concept_set", "selection", "methods"}
    methods = {"mammi", "www", "clip_dissect", "falcon", "falcon_simplified"}
    for name in ("mammi_nouns", "report_phrases"):  # both concept sets in the method comparison
        assert set(table.loc[(table.study == "methods") & (table.concept_set == name), "method"]) == methods
    assert set(table.loc[table.study == "methods", "method"]) == methods | {"tsi"}
    assert (table["n_units"] == len(probe.classes)).all()
    assert "cos_clip" not in table and table["cos_vlm"].notna().all()  # no independent CLIP given: no cos_clip
    for name in ("mammi_nouns", "report_phrases"):
        mammi = rows[("concept_set", name, "mammi", "alpha=0.93")]
        assert mammi.hit_rate == 1.0 and mammi.f1 > 0.5, mammi.predicted  # every planted unit named
        assert rows[("methods", name, "clip_dissect", "soft-WPMI defaults")].hit_rate == 1.0
    assert rows[("concept_set", "generic", "mammi", "alpha=0.93")].hit_rate == 0.0  # no finding among the words
    assert rows[("selection", "mammi_nouns", "www", "fixed top_k=10")].hit_rate == 1.0
    nouns = json.loads(rows[("concept_set", "mammi_nouns", "mammi", "alpha=0.93")].predicted)
    assert all(" " not in c for pred in nouns.values() for c in pred)  # MAMMI's set: single nouns only
    # TSI (network dissection, threshold at the top q of all pixels, IoU > 0.04): a planted map equal to the box
    # mask has IoU = (box share of all pixels) / q when that share is below q, so only classes whose boxes cover
    # more than 0.04 * q of the probing pixels can be named, and those must be named right.
    _, cams = cb.final_layer(None, probe.images, 32)
    share = (cams > 0.5).float().mean(dim=(0, 2, 3)).numpy()  # (C,)
    q = cb.BenchConfig().dissection_q
    nameable = {probe.classes[c] for c in np.flatnonzero(share / q > 0.04 * 1.1)}
    assert nameable, share
    tsi = table[table.method == "tsi"].iloc[0]
    named = {cls for cls, pred in json.loads(tsi.predicted).items() if pred}
    assert named >= nameable and tsi.hit_rate * tsi.n_units == pytest.approx(tsi.n_annotated)  # all named right


@pytest.mark.slow
def test_mlflow_run_logs_the_table_with_every_study(tmp_path, tiny_phantom, monkeypatch):
    """As the README runs it: `mlflow run . -e concept_benchmark` (the launcher logs reports='' and
    generic_words=''; the entry point used to re-log them and fail with 'Changing param values is not
    allowed')."""
    from tests.mlflow_projects.mlflow_run import artifacts_under_root, client, mlflow_run, project_env, setup_store

    env = project_env(tmp_path)
    setup_store(env)
    for key in ("MLFLOW_TRACKING_URI", "CXR_ARTIFACT_ROOT"):
        monkeypatch.setenv(key, env[key])
    version = register_tiny_classifier(tmp_path)
    proc = mlflow_run("concept_benchmark", {"data": tiny_phantom, "model_uri": f"models:/cxr-classifier/{version}",
                                            "clip": "scratch", "max_images": 48}, env, "concept_benchmark")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "concept benchmark: final-layer units of models:/cxr-classifier/1" in proc.stdout  # the table, printed
    c = client(env)
    (run,) = c.search_runs([c.get_experiment_by_name("concept_benchmark").experiment_id])
    assert artifacts_under_root(run, env)
    assert run.data.params["max_images"] == "48" and run.data.params["resolved.reports"] == ""
    assert run.data.params["data"] == str(tiny_phantom) and "resolved.data" not in run.data.params  # same value
    assert run.data.tags["model_uri"].endswith(f"cxr-classifier/{version}")
    assert run.data.tags["clip"].startswith("scratch:") and run.data.tags["manifest"] == str(tiny_phantom)
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="concept_benchmark",
                                                 dst_path=str(tmp_path / "dl"))
    table = pd.read_parquet(f"{folder}/table.parquet")
    assert pd.read_csv(f"{folder}/table.csv").shape == table.shape
    assert {"concept_set", "selection", "methods"} == set(table["study"])
    assert {"mammi", "www", "clip_dissect", "falcon", "falcon_simplified"} <= set(table["method"])
    assert table["hit_rate"].between(0, 1).all() and (table["n_units"] == 9).all()
    logged = run.data.metrics
    assert {"concept_set.generic.mammi.hit_rate", "concept_set.mammi_nouns.mammi.hit_rate",
            "selection.mammi_nouns.www.k10.hit_rate", "methods.report_phrases.clip_dissect.f1"} <= set(logged)
    row = table[(table.study == "methods") & (table.method == "clip_dissect") & (table.concept_set == "report_phrases")]
    assert logged["methods.report_phrases.clip_dissect.f1"] == pytest.approx(row.iloc[0].f1)
    protocol = json.loads(open(f"{folder}/protocol.json").read())
    assert protocol["evaluation"]["protocol"] == "mammi" and protocol["probing_set"]["split"] == "test"
    assert "not computed" in protocol["evaluation"]["encoders"]["clip"] and "cos_clip" not in table
    assert "circular" in protocol["evaluation"]["encoders"]["vlm"] and table["cos_vlm"].notna().all()
    # a missing manifest, an unknown version: one line, exit 2, before any model is loaded
    proc = mlflow_run("concept_benchmark", {"data": tmp_path / "nope.parquet"}, env)
    assert proc.returncode != 0 and f"manifest not found: {tmp_path / 'nope.parquet'}" in proc.stderr
    proc = mlflow_run("concept_benchmark", {"data": tiny_phantom, "model_uri": "models:/cxr-classifier/7",
                                            "clip": "scratch"}, env)
    assert "concept_benchmark: error: cxr-classifier has no version 7; versions: 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_protocol_independent_clip_and_empty_units(planted, monkeypatch):
    """Issue 14 defect 3 in the benchmark: cos_clip comes only from an independent text encoder (the annotating
    VLM's own is cos_vlm, named as circular); under MAMMI's protocol no unit's cosine is dropped."""
    from mlflow_projects import concept_benchmark as cb

    probe, vlm, _ = planted
    monkeypatch.setattr(cb, "final_layer", _planted_final_layer(probe))
    generic = [""]  # its prompt is the base template itself: score 0 for every unit, so every unit is empty

    def independent(texts):  # a different text space from the oracle's: a hash per string, other seeds
        return torch.stack([_vec("independent " + t) for t in texts])

    table = cb.run_benchmark(cb.BenchConfig(), None, probe, vlm, generic, eval_encoder=independent)
    assert table[["cos_clip", "cos_vlm"]].notna().all().all()  # empty units are scored, not dropped
    generic_row = table[(table.study == "concept_set") & (table.concept_set == "generic")].iloc[0]
    assert generic_row.n_annotated == 0 and generic_row.n_units == len(probe.classes)  # nothing to say ...
    assert abs(generic_row.cos_vlm) < 0.3  # ... and still scored: cos("none", class name), near 0 here
    from interpret.evaluation import evaluate_final_layer

    for row in table.itertuples():  # cos_clip is the independent encoder's, cos_vlm the annotating VLM's
        pred = list(json.loads(row.predicted).values())
        ind = evaluate_final_layer(pred, probe.classes, encode_texts=independent, sentence_encoders=[])
        own = evaluate_final_layer(pred, probe.classes, encode_texts=vlm.encode_texts, sentence_encoders=[])
        assert row.cos_clip == pytest.approx(ind["cos_clip"]) and row.cos_vlm == pytest.approx(own["cos_clip"])


def test_seed_summary_mean_and_sd():
    from mlflow_projects.concept_benchmark import summarize_seeds

    t = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "study": ["m"] * 6, "concept_set": ["a"] * 3 + ["b"] * 3,
                      "method": ["mammi"] * 6, "setting": ["s"] * 6, "hit_rate": [0.0, 0.5, 1.0, 1, 1, 1],
                      "f1": [0.2, 0.4, 0.6, 0, 0, 0]})
    out = summarize_seeds(t).set_index("concept_set")
    assert out.loc["a", "hit_rate_mean"] == 0.5 and out.loc["a", "hit_rate_sd"] == pytest.approx(0.5)
    assert out.loc["b", "f1_sd"] == 0.0 and (out["n_seeds"] == 3).all()


@pytest.mark.slow
def test_mlflow_run_seeds_trains_per_seed_and_summarises(tmp_path, tiny_phantom, monkeypatch):
    """The study command, as docs/REPRODUCTION.md runs it (tiny sizes): per training seed a classifier
    and a CLIP are trained on the train split, the independent evaluation CLIP once on a separate phantom, and
    the mean / SD over seeds is logged beside the per-seed table."""
    from tests.mlflow_projects.mlflow_run import client, mlflow_run, project_env, setup_store

    env = project_env(tmp_path)
    setup_store(env)
    proc = mlflow_run("concept_benchmark", {"data": tiny_phantom, "seeds": "0,1", "arch": "test_resnet", "epochs": 1,
                                            "clip_epochs": 1, "eval_clip": "train", "eval_phantom_n": 24},
                      env, "concept_benchmark")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mean and SD over training seeds 0,1" in proc.stdout and '"protocol": "mammi"' in proc.stdout
    c = client(env)
    (run,) = c.search_runs([c.get_experiment_by_name("concept_benchmark").experiment_id])
    folder = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="concept_benchmark",
                                                 dst_path=str(tmp_path / "dl"))
    table = pd.read_parquet(f"{folder}/table.parquet")
    seeds = pd.read_csv(f"{folder}/seeds.csv")
    protocol = json.loads(open(f"{folder}/protocol.json").read())
    assert set(table["seed"]) == {0, 1} and (seeds["n_seeds"] == 2).all()
    assert len(seeds) == len(table) // 2 and {"hit_rate_mean", "hit_rate_sd", "cos_clip_mean"} <= set(seeds)
    assert table["cos_clip"].notna().all()  # the independent CLIP scores every unit, empty ones included
    assert "separate" in protocol["evaluation"]["encoders"]["clip"] and protocol["seeds"]["seeds"] == [0, 1]
    assert "training seeds" in protocol["seeds"]["what"] and len(protocol["seeds"]["trained"]) == 2
    row = seeds[(seeds.study == "methods") & (seeds.concept_set == "mammi_nouns") & (seeds.method == "mammi")].iloc[0]
    per_seed = table[(table.study == "methods") & (table.concept_set == "mammi_nouns") & (table.method == "mammi")]
    assert row.hit_rate_mean == pytest.approx(per_seed["hit_rate"].mean())
    assert run.data.metrics["methods.mammi_nouns.mammi.hit_rate"] == pytest.approx(row.hit_rate_mean)
