"""What the service decides at start-up: where it binds (refusing an exposed address without keys) and
which model it serves from a Bento (found next to service.py, without the Bento's envs)."""
from __future__ import annotations

import pytest
import yaml

from mlflow_projects.serving import ServeConfig, UnsafeBindError, check_bind_address, find_packaged_model, startup_config
from mlflow_projects.serving.settings import DEFAULT_HOST, is_loopback, requested_host

SERVE = ["/venv/bin/bentoml", "serve", "service:CXRExplainer"]


def test_requested_host_precedence():
    assert requested_host(SERVE, {}) == DEFAULT_HOST == "127.0.0.1"  # the service's http.host
    assert requested_host(SERVE, {"BENTOML_HOST": "0.0.0.0"}) == "0.0.0.0"  # click's envvar of --host
    assert requested_host([*SERVE, "--host", "10.0.0.5"], {"BENTOML_HOST": "0.0.0.0"}) == "10.0.0.5"
    assert requested_host([*SERVE, "--port", "3000", "--host=::"], {}) == "::"
    assert requested_host(["pytest", "--host", "0.0.0.0"], {}) == DEFAULT_HOST  # not a bentoml serve command line


def test_is_loopback():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "example.org", ""))


def test_check_bind_address_refuses_exposed_anonymous_service():
    check_bind_address("127.0.0.1", ())  # loopback: keys optional
    check_bind_address("::1", ())
    check_bind_address("0.0.0.0", ("k1",))  # exposed with keys
    check_bind_address("0.0.0.0", (), allow_anonymous=True)  # exposed anonymously, on purpose
    for host in ("0.0.0.0", "::", "10.0.0.5"):
        with pytest.raises(UnsafeBindError) as err:
            check_bind_address(host, ())
        msg = str(err.value)
        assert host in msg and "CXR_API_KEYS" in msg and "CXR_ALLOW_ANONYMOUS=1" in msg and "BENTOML_HOST" in msg
    with pytest.raises(UnsafeBindError):
        check_bind_address("0.0.0.0", ("",))  # an empty key is no key


def test_startup_config_checks_the_bind_from_argv_and_env(tmp_path):
    exposed = [*SERVE, "--host", "0.0.0.0"]
    with pytest.raises(UnsafeBindError, match="CXR_API_KEYS"):
        startup_config(tmp_path, exposed, {})
    with pytest.raises(UnsafeBindError):
        startup_config(tmp_path, SERVE, {"BENTOML_HOST": "0.0.0.0", "CXR_ALLOW_ANONYMOUS": "0"})
    assert startup_config(tmp_path, exposed, {"CXR_API_KEYS": "a,b"}).api_keys == ("a", "b")
    assert startup_config(tmp_path, exposed, {"CXR_ALLOW_ANONYMOUS": "1"}).allow_anonymous
    cfg = startup_config(tmp_path, SERVE, {})  # loopback default, no keys: fine
    assert cfg.local_model_dir is None and cfg.api_keys == ()
    with pytest.raises(ValueError, match="CXR_ALLOW_ANONYMOUS"):
        ServeConfig.from_env({"CXR_ALLOW_ANONYMOUS": "maybe"})


def _fake_bento(root, models, envs=()):
    """A Bento's layout: bento.yaml, src/, models/<name>/<version>/model.yaml with labels."""
    (root / "src").mkdir(parents=True)
    tags = []
    for name, version, labels in models:
        folder = root / "models" / name / version
        folder.mkdir(parents=True)
        (folder / "model.yaml").write_text(yaml.safe_dump({"name": name, "version": version, "labels": labels}))
        (root / "models" / name / "latest").write_text(version)
        tags.append({"tag": f"{name}:{version}", "module": ""})
    (root / "bento.yaml").write_text(yaml.safe_dump({"service": "service:CXRExplainer", "models": tags,
                                                     "envs": [{"name": k, "value": v} for k, v in envs]}))
    return root / "src"


def test_packaged_model_found_next_to_the_service_without_envs(tmp_path):
    labels = {"mlflow.name": "cxr-classifier", "mlflow.version": "3", "mlflow.alias": "champion",
              "audit.run_id": "abc"}
    src = _fake_bento(tmp_path / "bento", [("cxr-classifier", "v1", labels)])
    found = find_packaged_model(src, {})
    assert found.path == tmp_path / "bento" / "models" / "cxr-classifier" / "v1"
    assert found.tag == "cxr-classifier:v1"
    assert found.identity == {"name": "cxr-classifier", "version": "3", "alias": "champion", "audit_run_id": "abc"}
    assert find_packaged_model(src, {"CXR_BENTO_MODEL": "cxr-classifier:latest"}).path == found.path
    cfg = startup_config(src, SERVE, {})
    assert cfg.local_model_dir == str(found.path) and cfg.local_identity["version"] == "3"
    assert find_packaged_model(tmp_path, {}) is None  # not in a Bento: the registry


def test_packaged_model_choice_among_several(tmp_path):
    two = [("a", "v1", {"mlflow.name": "a"}), ("b", "v2", {"mlflow.name": "b"})]
    src = _fake_bento(tmp_path / "one", two)
    with pytest.raises(ValueError, match="CXR_BENTO_MODEL"):
        find_packaged_model(src, {})
    assert find_packaged_model(src, {"CXR_BENTO_MODEL": "b:v2"}).identity["name"] == "b"
    src = _fake_bento(tmp_path / "two", two, envs=[("CXR_BENTO_MODEL", "a:v1")])  # the build's choice
    assert find_packaged_model(src, {}).identity["name"] == "a"
