"""The model card: built from an audit's summary (every section, the regulatory mapping naming every
Article 13(3) item, "not known" where nothing is known), written by the audit into its run and linked from
the version's description, and rebuilt by ``mlflow run . -e model_card`` with the provider's statements."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from interpret.audit.model_card import ARTICLE_13_3, NOT_KNOWN, SECTIONS, CardFacts, build_model_card
from tests.mlflow_projects.audit_fixtures import register_tiny_classifier, tracking, write_gates
from tests.mlflow_projects.mlflow_run import mlflow_run, project_env

ROOT = Path(__file__).resolve().parents[2]
ART13 = ["13(3)(a)", "13(3)(b)(i)", "13(3)(b)(ii)", "13(3)(b)(iii)", "13(3)(b)(iv)", "13(3)(b)(v)", "13(3)(b)(vi)",
         "13(3)(b)(vii)", "13(3)(c)", "13(3)(d)", "13(3)(e)", "13(3)(f)"]


def _section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_a_card_of_almost_nothing_says_not_known_and_maps_every_article_13_item():
    summary = {"model": {"name": "m", "version": "4", "uri": "models:/m/4", "classes": ["Effusion"],
                         "thresholds": [None], "unreliable_thresholds": {"Effusion": "no reliable threshold: 2 "
                                                                                     "validation positive(s) (< 5)"}},
               "data": {"n_images": 30}}
    card = build_model_card(summary)
    assert card.section_ids == [sid for sid, _ in SECTIONS]
    md = card.markdown
    for _, title in SECTIONS:
        assert f"## {title}\n" in md and f"<h2>{title}</h2>" in card.html
    assert NOT_KNOWN in _section(md, "2. Intended use and users")
    assert "Manifest SHA-256 | not known" in md and "Provider and contact | not known" in md
    assert "no reliable threshold: 2 validation positive(s) (< 5)" in _section(md, "8. Decision thresholds")
    assert "Whether the probing set is real or synthetic: not known" in md
    assert [i for i, *_ in ARTICLE_13_3] == ART13
    items = {m["item"]: m for m in card.mapping if m["regime"].startswith("EU AI Act")}
    assert list(items) == ART13
    reg = _section(md, "12. Regulatory mapping")
    for item in ART13:
        assert f"| {item} |" in reg
    assert items["13(3)(a)"]["status"] == "partly covered"  # the provider is not known
    assert items["13(3)(b)(v)"]["status"] == "not covered"  # no per-group performance
    assert items["13(3)(f)"]["status"] == "partly covered"  # where the records go is not known here
    fda = [m["item"] for m in card.mapping if m["regime"].startswith("FDA")]
    assert {"Device description", "Data management", "Model description", "Validation: performance",
            "Labeling"} <= set(fda)
    # stated facts replace "not known"
    card = build_model_card(summary, CardFacts(provider="Team X, x@example.org", intended_use="Second reader",
                                               intended_users="Radiologists", probe_sources={"phantom": 30},
                                               service={"records_dir": "/var/cxr/records", "retention_days": 183}))
    assert "Second reader" in card.markdown and "Team X, x@example.org" in card.markdown
    assert "Validated on synthetic phantom images only" in card.markdown
    items = {m["item"]: m for m in card.mapping}
    assert items["13(3)(b)(i)"]["status"] == "covered" and items["13(3)(f)"]["status"] == "covered"
    assert "<script" not in build_model_card({**summary, "model": {**summary["model"],
                                                                   "name": "<script>x</script>"}}).html


@pytest.mark.slow
def test_the_audit_writes_and_links_the_card_and_model_card_rebuilds_it(tmp_path, tiny_phantom):
    import mlflow
    from mlflow import MlflowClient

    from mlflow_projects import audit
    from mlflow_projects.common import data_tags

    gates = write_gates(tmp_path / "gates.yaml", auroc_mean=0.0)
    with tracking(tmp_path) as uri:
        version = register_tiny_classifier(tmp_path)
        client = MlflowClient()
        train_run = client.get_model_version("cxr-classifier", version).run_id
        # what train_classifier records about its run (params, data tags, class distribution)
        for key, value in {"arch": "test_resnet", "loss": "focal", "epochs": "3", "min_val_positives": "5"}.items():
            client.log_param(train_run, key, value)
        for key, value in {"manifest": str(tiny_phantom), **data_tags(tiny_phantom)}.items():
            client.set_tag(train_run, key, value)
        client.log_dict(train_run, {"train": {"images": 30, "positives": {"Effusion": 6, "Nodule": 2}},
                                    "val": {"images": 10, "positives": {"Effusion": 2, "Nodule": 1}}},
                        "data/class_distribution.json")
        argv = ["--model-uri", f"models:/cxr-classifier/{version}", "--data", str(tiny_phantom), "--split", "all",
                "--clip", "scratch", "--gates", str(gates), "--max-images", "16", "--gallery-n", "1",
                "--out", str(tmp_path / "a")]
        assert audit.main(argv) == 0
        mv = client.get_model_version("cxr-classifier", version)
        run_id = mv.tags["audit.run_id"]
        md = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/audit/model_card.md")).read_text()
        page = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/audit/model_card.html")).read_text()
        for _, title in SECTIONS:
            assert f"## {title}\n" in md and f"<h2>{title}</h2>" in page
        assert f"Audit run | {run_id}" in md and f"Training run | {train_run}" in md
        sha = data_tags(tiny_phantom)["data.manifest_sha256"]
        data = _section(md, "5. Training data")
        assert sha in data and "phantom (48 images)" in data and "| Effusion | 6 | 2 | 4.0 : 1 |" in data
        perf = _section(md, "7. Performance per class")
        summary = mlflow.artifacts.load_dict(f"runs:/{run_id}/audit/summary.json")
        for row in summary["performance"]:
            assert f"| {row['class']} | {row['n_pos']} |" in perf
        expl = _section(md, "9. Explanation behaviour")
        assert all(f"| {v['class']} | {v['verdict']} |" in expl for v in summary["verdicts"])
        lim = _section(md, "10. Limitations and known failure modes")
        assert "Validated on synthetic phantom images only" in lim
        assert all(c in lim for c in summary["unfit_classes"])
        assert "Intended purpose (stated by the provider) | not known" in md
        assert f"runs:/{run_id}/audit/model_card.md" in mv.description

    # the provider states the intended use: the README's command rebuilds the card in the same audit run
    env = project_env(tmp_path)
    env["MLFLOW_TRACKING_URI"] = uri
    proc = mlflow_run("model_card", {"model_uri": f"models:/cxr-classifier/{version}",
                                     "intended_use": "Second reader for adult frontal chest films",
                                     "provider": "Imaging AI team, ai@example.org", "out": tmp_path / "card"}, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "card" / "model_card.md").read_text()
    assert "Second reader for adult frontal chest films" in md and "Imaging AI team, ai@example.org" in md
    with tracking(tmp_path, uri):
        client = MlflowClient()
        mv = client.get_model_version("cxr-classifier", version)
        assert mv.tags["intended_use"] == "Second reader for adult frontal chest films"
        assert mv.description.count("Model card:") == 1
        logged = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/audit/model_card.md")).read_text()
        assert "Second reader for adult frontal chest films" in logged
        # promotion rewrites the description with the audit summary and keeps pointing at the card
        from mlflow_projects import promote

        assert promote.main(["--name", "cxr-classifier", "--version", version, "--gates", str(gates)]) == 0
        desc = client.get_model_version("cxr-classifier", version).description
        assert desc.count("Model card:") == 1 and f"runs:/{run_id}/audit/model_card.md" in desc
        assert "Audit passed" in desc
    # bad input: one line, exit 2, nothing written
    cmd = [sys.executable, "-m", "mlflow_projects.model_card", "--out", str(tmp_path / "bad")]
    for uri_arg, words in (("models:/cxr-classifier/9", "version"), ("models:/nope/1", "nope")):
        done = subprocess.run(cmd + ["--model-uri", uri_arg], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    with tracking(tmp_path, uri):
        unaudited = register_tiny_classifier(tmp_path, seed=1)
    done = subprocess.run(cmd + ["--model-uri", f"models:/cxr-classifier/{unaudited}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "has no audit" in done.stderr, done.stderr
    assert not (tmp_path / "bad").exists()
