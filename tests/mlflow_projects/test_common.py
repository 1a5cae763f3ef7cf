"""mlflow_projects.common: model references, the registry glue and "the audit of a version", on a real
SQLite MLflow store in a temporary folder (no model files: versions point at a run's folder)."""
from __future__ import annotations

import json

import pytest

from mlflow_projects import common
from mlflow_projects.common import (AuditNotFound, ModelIdentity, RegistryError, find_passing_audit,
                                    latest_audit, parse_model_uri, parse_version, resolve_model_uri,
                                    version_audit)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A SQLite store with ``cxr-classifier`` versions 1 (@candidate, audited: passed, with concepts)
    and 2 (no audit), and ``cxr-clip`` version 1 (no alias). Returns ``(client, audit_run_id)``."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CXR_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    common.setup_tracking("test-common")
    client = MlflowClient()
    with mlflow.start_run() as train:
        pass
    for name, n in (("cxr-classifier", 2), ("cxr-clip", 1)):
        client.create_registered_model(name)
        for _ in range(n):
            client.create_model_version(name, source=str(tmp_path), run_id=train.info.run_id)
    client.set_registered_model_alias("cxr-classifier", "candidate", "1")
    with mlflow.start_run() as audit:
        mlflow.log_dict({"status": "passed", "metrics": {"auroc_mean": 0.8}}, "audit/summary.json")
        table = pd.DataFrame({"layer": ["head"], "unit": [0], "method": ["mammi"], "concepts": [["effusion"]],
                              "scores": [[0.9]]})
        path = tmp_path / "concepts.parquet"
        table.to_parquet(path)
        mlflow.log_artifact(str(path), "audit")
        mlflow.set_tags({"model.name": "cxr-classifier", "model.version": "1", "audit.status": "passed"})
    client.set_model_version_tag("cxr-classifier", "1", "audit.run_id", audit.info.run_id)
    client.set_model_version_tag("cxr-classifier", "1", "audit.status", "passed")
    return client, audit.info.run_id


def test_parse_model_uri_forms_and_errors():
    assert parse_model_uri("models:/cxr-classifier/3") == ("cxr-classifier", "3", None)
    assert parse_model_uri("models:/cxr-classifier@champion") == ("cxr-classifier", None, "champion")
    assert parse_model_uri("cxr-clip/12") == ("cxr-clip", "12", None)
    assert parse_model_uri(" cxr-clip@candidate ") == ("cxr-clip", None, "candidate")
    for bad in ("models:/cxr-classifier", "models:/a/b/c", "runs:/abc/model", "", "models:/x@", "x/1.5"):
        with pytest.raises(ValueError, match="valid forms: models:/NAME/VERSION, models:/NAME@ALIAS"):
            parse_model_uri(bad)


def test_parse_version():
    assert parse_version("3") == ("3", None)
    assert parse_version(7) == ("7", None)
    assert parse_version("@champion") == (None, "champion")
    assert parse_version("candidate") == (None, "candidate")
    assert parse_version("") == (None, None) and parse_version(None) == (None, None)
    for bad in ("0", "-1", "1.5", "@", "two words"):
        with pytest.raises(ValueError, match="positive integer"):
            parse_version(bad)


def test_resolve_version_alias_and_fallback(store, caplog):
    client, _ = store
    ident = resolve_model_uri("models:/cxr-classifier/2", client)
    assert (ident.name, ident.version, ident.alias, ident.uri, ident.fallback) == \
        ("cxr-classifier", "2", None, "models:/cxr-classifier/2", False)
    ident = resolve_model_uri("models:/cxr-classifier/1")
    assert (ident.version, ident.alias) == ("1", "candidate") and ident.run_id
    ident = resolve_model_uri("models:/cxr-classifier@candidate")
    assert (ident.version, ident.alias, ident.fallback) == ("1", "candidate", False)
    with caplog.at_level("WARNING"):
        ident = resolve_model_uri("models:/cxr-classifier@champion")
    assert (ident.version, ident.alias, ident.fallback) == ("1", "candidate", True)
    assert ident.requested_uri == "models:/cxr-classifier@champion"
    assert "no version of cxr-classifier has alias 'champion'" in caplog.text
    assert ident.public() == {"name": "cxr-classifier", "version": "1", "alias": "candidate",
                              "uri": "models:/cxr-classifier/1"}
    # not a registry reference: returned as is
    assert resolve_model_uri("runs:/abc/model") == ModelIdentity(None, None, None, "runs:/abc/model", "runs:/abc/model")


def test_resolve_errors_list_valid_values(store):
    with pytest.raises(RegistryError, match=r"no registered model 'cxr-classifer'.*registered: cxr-classifier, cxr-clip"):
        resolve_model_uri("models:/cxr-classifer@candidate")
    with pytest.raises(RegistryError, match=r"cxr-classifier has no version 9; versions: 1, 2"):
        resolve_model_uri("models:/cxr-classifier/9")
    with pytest.raises(RegistryError, match=r"no alias 'stable'; aliases: @candidate \(version 1\)"):
        resolve_model_uri("models:/cxr-classifier@stable")
    # @champion falls back only when @candidate exists
    with pytest.raises(RegistryError, match=r"cxr-clip has no alias 'champion'; aliases: none"):
        resolve_model_uri("models:/cxr-clip@champion")
    assert issubclass(RegistryError, ValueError)


def test_latest_audit_and_version_audit(store):
    client, run_id = store
    rid, summary = latest_audit(client, "cxr-classifier", "1")
    assert rid == run_id and summary["status"] == "passed" and "mlflow" not in summary
    summary = version_audit("cxr-classifier", alias="candidate")
    assert summary["mlflow"]["run_id"] == run_id and summary["metrics"]["auroc_mean"] == 0.8
    assert version_audit("cxr-classifier", version="1")["status"] == "passed"
    with pytest.raises(AuditNotFound, match="cxr-classifier version 2 has no audit"):
        latest_audit(None, "cxr-classifier", "2")
    with pytest.raises(RegistryError, match="versions: 1, 2"):
        version_audit("cxr-classifier", version="5")
    with pytest.raises(RegistryError, match="no alias 'champion'"):
        version_audit("cxr-classifier", alias="champion")
    client.set_model_version_tag("cxr-classifier", "2", "audit.run_id", "0" * 32)
    with pytest.raises(AuditNotFound, match="cannot read audit/summary.json of audit run 0000"):
        latest_audit(client, "cxr-classifier", "2")


def test_find_passing_audit(store, tmp_path):
    client, run_id = store
    found = find_passing_audit("cxr-classifier", "1", client)
    assert found is not None
    assert found.run_id == run_id and list(found.concepts["concepts"].iloc[0]) == ["effusion"]
    assert found.summary["status"] == "passed" and found.folder is None and found.ood_path is None
    kept = find_passing_audit("cxr-classifier", "1", client, dst=tmp_path / "dl")  # files kept, one folder a run
    assert kept.folder == tmp_path / "dl" / run_id
    assert (kept.folder / "audit" / "concepts.parquet").is_file() and (kept.folder / "audit" / "summary.json").is_file()
    assert kept.ood_path is None  # this audit wrote no OOD detector
    assert find_passing_audit("cxr-classifier", "2") is None
    assert find_passing_audit(None, None) is None


def test_find_a_failed_audit_when_no_passing_one(store, tmp_path):
    """A version whose only audit failed: no passing audit, but the failed one is found when asked for (the
    service then serves its verdicts and OOD detector, not its concepts)."""
    import mlflow
    import pandas as pd

    client, _ = store
    with mlflow.start_run() as failed:
        mlflow.log_dict({"status": "failed", "verdicts": [{"class": "Effusion", "verdict": "unfit",
                                                           "reasons": ["too few"]}]}, "audit/summary.json")
        path = tmp_path / "concepts.parquet"
        pd.DataFrame({"layer": ["head"], "unit": [0], "method": ["mammi"], "concepts": [["x"]],
                      "scores": [[0.1]]}).to_parquet(path)
        mlflow.log_artifact(str(path), "audit")
        mlflow.set_tags({"model.name": "cxr-classifier", "model.version": "2", "audit.status": "failed"})
    assert find_passing_audit("cxr-classifier", "2", client) is None
    found = find_passing_audit("cxr-classifier", "2", client, status="failed")
    assert found.run_id == failed.info.run_id and found.summary["verdicts"][0]["verdict"] == "unfit"


def test_register_version_tags_and_alias(store, tmp_path):
    import mlflow

    client, _ = store
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "model")
    mv = common.register_version(f"runs:/{run.info.run_id}/model", "cxr-dwarf",
                                 {"classes": ["Effusion"], "kind": "dwarf"}, description="tiny")
    assert str(mv.version) == "1" and mv.tags["kind"] == "dwarf" and json.loads(mv.tags["classes"]) == ["Effusion"]
    assert resolve_model_uri("models:/cxr-dwarf@candidate").version == "1"


def _tiny_clip_configs(tmp_path):
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    rn = tmp_path / "rn.json"
    rn.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8,
                                                              "head_width": 16}, "text_cfg": text}))
    vit = tmp_path / "vit.json"
    vit.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                               "head_width": 16, "patch_size": 8}, "text_cfg": text}))
    return rn, vit


def test_resolve_clip_one_rule(store, tmp_path, monkeypatch):
    """Untrained only when asked by name; a models:/ URI that cannot be loaded and an unknown spec are errors;
    DWARF's ViT requirement is checked, not papered over."""
    from open_clip.transformer import VisionTransformer

    from mlflow_projects import pyfunc_clip
    from training.clip import load_clip

    bundle, described = common.resolve_clip("scratch", image_size=32, require_vit=True)
    assert described == "scratch:cxr-tiny-vit (untrained)" and isinstance(bundle.model.visual, VisionTransformer)
    assert common.resolve_clip("scratch:cxr-tiny-vit", 32)[1] == "scratch:cxr-tiny-vit (untrained)"
    with pytest.raises(ValueError, match=r"bad CLIP 'scratch:cxr-tiny-vt'.*cxr-tiny-vit"):
        common.resolve_clip("scratch:cxr-tiny-vt")
    with pytest.raises(ValueError, match=r"cannot load CLIP 'scrach'.*valid forms: models:/NAME/VERSION.*scratch"):
        common.resolve_clip("scrach")
    with pytest.raises(RegistryError, match=r"cxr-clip has no alias 'candidate'; aliases: none"):
        common.resolve_clip("models:/cxr-clip@candidate")
    # cxr-clip version 1 exists but its source holds no CLIP: an error, not an untrained fallback
    with pytest.raises(RegistryError, match=r"cannot load the CLIP models:/cxr-clip/1"):
        common.resolve_clip("models:/cxr-clip/1")
    rn, vit = _tiny_clip_configs(tmp_path)
    with pytest.raises(ValueError, match=r"ModifiedResNet image tower; DWARF needs a ViT.*'scratch'"):
        common.resolve_clip(str(rn), require_vit=True)
    assert common.resolve_clip(str(rn))[1] == str(rn)
    client, _ = store
    client.set_registered_model_alias("cxr-clip", "candidate", "1")
    monkeypatch.setattr(pyfunc_clip, "load_registered_clip", lambda uri: load_clip(str(vit)))
    bundle, described = common.resolve_clip("models:/cxr-clip@candidate", require_vit=True)
    assert described == "models:/cxr-clip@candidate (version 1)" and bundle.spec == "models:/cxr-clip@candidate"
    assert common.resolve_clip("models:/cxr-clip/1")[1] == "models:/cxr-clip/1"
