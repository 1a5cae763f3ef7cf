"""Per-request records of a real ``bentoml serve service:CXRExplainer`` over HTTP: 1,000 requests at
concurrency 8 leave exactly one record each (matched by the ``X-Request-ID`` each response carries), no PHI
of the DICOM fixtures reaches a record, and a SIGKILL in the middle of a burst leaves files that parse
with a record for every answered request."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlflow_projects.serving.records import read_records, verify_records
from tests.service.helpers import bentoml_serve, mask_png_bytes, png_bytes

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
N_REQUESTS = 1000
CONCURRENCY = 8


@pytest.fixture(scope="module")
def served(registry, tmp_path_factory):
    import httpx

    tmp = tmp_path_factory.mktemp("records-server")
    records = tmp / "records"
    env = dict(os.environ, MLFLOW_TRACKING_URI=registry.tracking_uri, BENTOML_HOME=str(tmp / "bentoml"),
               CXR_FEEDBACK_DIR=str(tmp / "feedback"), CXR_SERVE_CACHE=str(tmp / "cache"), CXR_THREADS="1",
               CXR_RECORDS_DIR=str(records), BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(ROOT))
    env.pop("CXR_API_KEYS", None)
    procs: list = []
    with bentoml_serve(["service:CXRExplainer", "--host", "127.0.0.1"], ROOT, env, tmp / "server.log",
                       procs=procs) as base:
        with httpx.Client(base_url=base, timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY * 2)) as c:
            yield c, records, procs[0], tmp / "server.log"


def _request(client, i: int, images: list[bytes]):
    """Request ``i`` of a mixed load: /predict mostly, /explain every 10th, /feedback every 50th, and a
    refused upload (415) every 100th; returns (request id, status)."""
    img = images[i % len(images)]
    if i % 100 == 3:
        r = client.post("/predict", content=img, headers={"content-type": "image/png"})
    elif i % 50 == 1:
        import hashlib

        r = client.post("/feedback", json={"finding": "Effusion", "image_sha256": hashlib.sha256(img).hexdigest(),
                                           "boxes": [[2, 3, 20, 18]], "author": "Dr. Feedback-Author"})
    elif i % 10 == 0:
        r = client.post("/explain", files={"image": (f"patient-{i}.png", img, "image/png")},
                        data={"method": "cam", "targets": "Effusion"})
    else:
        r = client.post("/predict", files={"image": (f"patient-{i}.png", img, "image/png")})
    return r.headers.get("x-request-id"), r.status_code


def test_every_request_of_a_load_has_exactly_one_record(served):
    client, folder, _, _ = served
    images = [png_bytes(72, 64, seed=s) for s in range(20)]
    before = {r["request_id"] for r in read_records(folder)}
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = list(pool.map(lambda i: _request(client, i, images), range(N_REQUESTS)))
    ids = [a[0] for a in answers]
    assert None not in ids and len(set(ids)) == N_REQUESTS  # every response names its record
    statuses = {rid: status for rid, status in answers}
    assert sorted(set(statuses.values())) == [200, 415]
    rep = verify_records(folder)
    assert rep.ok and not rep.torn_tails, rep.to_dict()
    recs = [r for r in read_records(folder) if r["request_id"] not in before]
    assert len(recs) == N_REQUESTS and {r["request_id"] for r in recs} == set(ids)  # one to one
    for r in recs:
        assert r["status"] == statuses[r["request_id"]]
        assert r["latency_ms"] is not None and r["latency_ms"] >= 0
        assert r["model"]["name"] == "cxr-classifier" and r["audit_run_id"]
    ok_explain = [r for r in recs if r["route"] == "/explain"]
    assert ok_explain and all(r["method"] == "cam" and r["targets"] == ["Effusion"] and r["layer"]
                              and len(r["input"]["sha256"]) == 64 and r["response_sha256"] for r in ok_explain)
    assert all(r["feedback_id"] for r in recs if r["route"] == "/feedback" and r["status"] == 200)
    text = "".join(p.read_text() for p in folder.glob("*.jsonl"))
    assert "patient-" not in text and "Feedback-Author" not in text  # client file names, free text


def test_no_phi_of_the_dicom_fixtures_in_any_record(served, real_fixtures):
    import pydicom

    client, folder, _, log_path = served
    secrets = []
    for path in sorted((real_fixtures / "dicom").glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        secrets += [str(ds.get(k)) for k in ("PatientName", "PatientID", "PatientBirthDate", "SOPInstanceUID",
                                             "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber",
                                             "InstitutionName", "ReferringPhysicianName")
                    if ds.get(k) not in (None, "")]
        secrets.append(path.stem)  # the file name (here a SOP instance UID) as the client sent it
        for route, data in (("/predict", {}), ("/explain", {"method": "gradcam"})):
            r = client.post(route, files={"image": (path.name, path.read_bytes(), "application/dicom")}, data=data)
            assert r.status_code == 200, r.text[:300]
            rid = r.headers["x-request-id"]
            rec = next(x for x in read_records(folder) if x["request_id"] == rid)
            assert rec["input"]["width"] == r.json()["image"]["width"] and rec["input"]["bytes"] == path.stat().st_size
    secrets = [s for s in set(secrets) if len(s) >= 4]
    assert secrets
    text = "".join(p.read_text() for p in folder.glob("*.jsonl"))
    for s in secrets:
        assert s not in text, f"PHI {s!r} in a record"
    time.sleep(0.5)
    for s in secrets:
        assert s not in log_path.read_text(errors="replace"), f"PHI {s!r} in the server log"


def test_a_feedback_with_image_and_mask_records_the_image_not_the_mask(served):
    import hashlib

    client, folder, _, _ = served
    img = png_bytes(72, 64, seed=7)
    r = client.post("/feedback", files={"image": ("a.png", img, "image/png"),
                                        "mask": ("m.png", mask_png_bytes(72, 64), "image/png")},
                    data={"finding": "Effusion"})
    assert r.status_code == 200, r.text[:300]
    rec = next(x for x in read_records(folder) if x["request_id"] == r.headers["x-request-id"])
    assert rec["input"]["bytes"] == len(img) and rec["input"]["sha256"] == hashlib.sha256(img).hexdigest()
    assert rec["feedback_id"] == r.json()["id"]


def test_sigkill_mid_burst_leaves_parseable_files_with_every_answer_recorded(served):
    """Last in this module: it kills the module's server."""
    import httpx

    client, folder, proc, _ = served
    images = [png_bytes(72, 64, seed=100 + s) for s in range(8)]
    answered: list[str] = []
    sent = [0]
    stop = threading.Event()
    lock = threading.Lock()

    def hammer(k: int) -> None:
        i = k
        while not stop.is_set():
            with lock:
                sent[0] += 1
            try:
                rid, status = _request(client, i, images)
            except httpx.HTTPError:
                return  # the server is gone
            if rid:
                with lock:
                    answered.append(rid)
            i += CONCURRENCY

    before = len(read_records(folder))
    threads = [threading.Thread(target=hammer, args=(k,), daemon=True) for k in range(CONCURRENCY)]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(answered) < 150 and time.time() < deadline:
        time.sleep(0.01)
    import psutil

    # the whole server, mid-burst: the supervisor and its workers (BentoML's workers start sessions of
    # their own, so killing the process group alone would leave them serving)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert any("worker" in " ".join(p.cmdline()) for p in tree[1:])
    for p in tree:
        p.send_signal(signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(30)
    proc.wait(10)
    psutil.wait_procs(tree, timeout=10)
    assert len(answered) >= 150 and not [p for p in tree if p.is_running() and p.status() != "zombie"]
    assert sent[0] > len(answered)  # requests were in flight when it died
    rep = verify_records(folder)
    assert rep.ok, rep.to_dict()  # every complete line parses (a torn last line would be reported, not fatal)
    recorded = {r["request_id"] for r in read_records(folder)}
    missing = [rid for rid in answered if rid not in recorded]
    assert not missing, f"{len(missing)} answered requests without a record"
    assert len(recorded) - before <= sent[0]  # nothing recorded that was never sent
    print(json.dumps({"answered": len(answered), "sent": sent[0], "new_records": len(recorded) - before,
                      "torn_tails": rep.torn_tails}))
