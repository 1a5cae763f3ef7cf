"""build_bento: the registered model lands in a temporary BentoML store with its MLflow labels, a Bento is
built offline with the version's audit files (concepts, summary.json verdicts, ood.npz), the service core
serves the store copy with the registry's identity and the audit's verdicts and OOD detector, and a real
``bentoml serve <bento>`` (no registry, no envs applied) serves the packaged model over HTTP without
creating an ``mlflow.db``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.service.helpers import CLASSES, bentoml_serve, png_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(registry, tmp_path_factory):
    """(model, bento, BENTOML_HOME) of a Bento built from the registry's @candidate in a temporary store."""
    home = tmp_path_factory.mktemp("bentoml-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("BENTOML_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    from bentoml._internal.configuration.containers import BentoMLContainer

    old_home = BentoMLContainer.bentoml_home.get()
    BentoMLContainer.bentoml_home.set(str(home))
    try:
        from mlflow_projects.build_bento import build_bento, import_model

        model = import_model("models:/cxr-classifier@champion")  # falls back to @candidate
        bento = build_bento(str(model.tag))
        yield model, bento, home
    finally:
        BentoMLContainer.bentoml_home.set(old_home)
        mp.undo()


def test_import_build_and_serve_from_store(built, registry, tmp_path):
    import bentoml

    from mlflow_projects.serving import ExplanationService, ServeConfig

    model, bento, home = built
    labels = bentoml.models.get(model.tag).info.labels
    assert labels["mlflow.name"] == "cxr-classifier" and labels["mlflow.version"] == registry.version
    assert labels["mlflow.alias"] == "candidate" and labels["audit.run_id"] == registry.audit_run_id
    assert str(model.path).startswith(str(home)) and (home / "models").is_dir()
    packed = Path(model.path) / "audit"
    assert sorted(p.name for p in packed.iterdir()) == ["concepts.parquet", "ood.npz", "summary.json"]
    assert (packed / "summary.json").read_bytes() == (registry.audit_folder / "summary.json").read_bytes()
    assert (packed / "ood.npz").read_bytes() == (registry.audit_folder / "ood.npz").read_bytes()
    assert str(model.tag) in {str(m.tag) for m in bento.info.models}
    envs = [e if isinstance(e, dict) else {"name": e.name, "value": e.value} for e in bento.info.envs]
    assert {"name": "CXR_BENTO_MODEL", "value": str(model.tag)} in envs  # for containers, which apply envs
    src, root = Path(bento.path) / "src", Path(__file__).resolve().parents[2]
    for pkg in ("mlflow_projects", "interpret", "training"):  # a container has no editable install to fall back on
        missing = [str(f.relative_to(root)) for f in (root / pkg).rglob("*.py")
                   if "__pycache__" not in f.parts and not (src / f.relative_to(root)).is_file()]
        assert not missing, f"the Bento lacks modules it may import: {missing}"
    assert (src / "service.py").is_file() and (src / "mlflow_projects" / "gates.yaml").is_file()
    assert not [p for p in src.rglob("service.py") if p != src / "service.py"]  # no earlier bento packed inside

    cfg = ServeConfig(local_model_dir=model.path, threads=1, feedback_dir=str(tmp_path / "fb"),
                      cache_dir=str(tmp_path / "cache"),
                      local_identity={"name": labels["mlflow.name"], "version": labels["mlflow.version"],
                                      "alias": labels["mlflow.alias"], "audit_run_id": labels["audit.run_id"]})
    svc = ExplanationService(cfg)
    svc.load()
    r = svc.predict(png_bytes())
    assert r["model"] == {"name": "cxr-classifier", "version": registry.version, "alias": "candidate",
                          "uri": f"models:/cxr-classifier/{registry.version}"}
    assert r["ood"]["threshold"] == pytest.approx(registry.summary["ood"]["threshold"])
    c = svc.concepts()
    assert c["audit_run_id"] == registry.audit_run_id and c["n_units"] + c["n_withheld"] == 32
    e = svc.explain(png_bytes(), method="cam", targets=CLASSES)
    verdicts = {v["class"]: v["verdict"] for v in registry.summary["verdicts"]}
    assert [h["verdict"]["status"] for h in e["heatmaps"]] == [verdicts[c] for c in CLASSES]


def test_bentoml_serve_the_bento_without_registry(built, registry, tmp_path):
    """``bentoml serve cxr-explainer:<version>`` as the README runs it: the Bento's envs are not applied and
    no tracking URI is set, yet the packaged model is served (200, not 503) and no mlflow.db appears."""
    import httpx

    model, bento, home = built
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CXR_", "MLFLOW_")) and k not in ("PYTHONPATH", "BENTOML_HOST")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", CXR_THREADS="1",
               CXR_FEEDBACK_DIR=str(tmp_path / "feedback"), CXR_SERVE_CACHE=str(tmp_path / "cache"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # no --host: the service's default, 127.0.0.1
    with bentoml_serve([str(bento.tag)], cwd, env, tmp_path / "server.log") as base:
        r = httpx.post(f"{base}/predict", files={"image": ("x.png", png_bytes(80, 72), "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == {"name": "cxr-classifier", "version": registry.version, "alias": "candidate",
                                     "uri": f"models:/cxr-classifier/{registry.version}"}
        assert [f["name"] for f in r.json()["findings"]] == CLASSES
        assert r.json()["ood"]["threshold"] == pytest.approx(registry.summary["ood"]["threshold"])
        c = httpx.get(f"{base}/concepts", timeout=30)
        assert c.status_code == 200 and c.json()["audit_run_id"] == registry.audit_run_id
        assert c.json()["n_units"] + c.json()["n_withheld"] == 32
        e = httpx.post(f"{base}/explain", files={"image": ("x.png", png_bytes(80, 72), "image/png")},
                       data={"targets": "Effusion"}, timeout=60)
        assert e.status_code == 200, e.text
        ref = next(v for v in registry.summary["verdicts"] if v["class"] == "Effusion")
        assert e.json()["heatmaps"][0]["verdict"]["status"] == ref["verdict"]
        assert e.json()["heatmaps"][0]["verdict"]["audit_run_id"] == registry.audit_run_id
    assert not list(home.rglob("mlflow.db")) and not list(cwd.rglob("mlflow.db"))
    assert not list(Path(bento.path).rglob("*.db"))
