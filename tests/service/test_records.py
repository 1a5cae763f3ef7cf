"""The per-request records (:mod:`mlflow_projects.serving.records`): the writer (whole lines, daily files,
retention), the readers (verify, export, a torn tail), the middleware (one record per request, written
before the answer leaves, refusals included) and the command line as a compliance officer runs it."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from mlflow_projects.serving.middleware import middleware_stack, wrap
from mlflow_projects.serving.records import (RecordWriter, export_records, note_request, note_response, read_records,
                                             record_files, verify_records)

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 11, 30, 23, 59, 59, tzinfo=dt.timezone.utc)


def _rec(i: int, t: dt.datetime) -> dict:
    return {"schema": 1, "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "request_id": f"{i:032x}", "route": "/predict",
            "status": 200, "model": {"name": "m", "version": "1", "alias": None, "uri": "models:/m/1"},
            "input": {"sha256": "ab" * 32, "bytes": 10}, "targets": ["Effusion"]}


class Clock:
    def __init__(self, t: dt.datetime) -> None:
        self.t = t

    def __call__(self) -> dt.datetime:
        return self.t


def test_writer_rotates_daily_and_keeps_whole_lines(tmp_path):
    clock = Clock(T0)
    w = RecordWriter(tmp_path, clock=clock)
    w.write(_rec(1, T0))
    w.write(_rec(2, T0 + dt.timedelta(seconds=2)))  # past midnight UTC: the next day's file
    w.close()
    files = record_files(tmp_path)
    assert [p.name for _, p in files] == ["requests-2026-11-30.jsonl", "requests-2026-12-01.jsonl"]
    for _, p in files:
        data = p.read_bytes()
        assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert [r["request_id"] for r in read_records(tmp_path)] == [f"{1:032x}", f"{2:032x}"]


def test_retention_removes_only_files_past_the_limit(tmp_path):
    today = T0.date()
    for days in (400, 184, 183, 10, 0):
        (tmp_path / f"requests-{(today - dt.timedelta(days=days)).isoformat()}.jsonl").write_text("")
    (tmp_path / "notes.txt").write_text("kept")
    (tmp_path / "requests-2020-01-01.jsonl.bak").write_text("kept: not a record file")
    w = RecordWriter(tmp_path, retention_days=183, clock=Clock(T0))  # prunes when it starts
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"requests-{(today - dt.timedelta(days=d)).isoformat()}.jsonl" for d in (183, 10, 0)]
                          + ["notes.txt", "requests-2020-01-01.jsonl.bak"])
    # and when the day changes, with the day of the record being written
    w.write(_rec(1, T0 + dt.timedelta(days=11)))
    assert not (tmp_path / f"requests-{(today - dt.timedelta(days=183)).isoformat()}.jsonl").exists()
    assert (tmp_path / f"requests-{(today - dt.timedelta(days=10)).isoformat()}.jsonl").exists()
    with pytest.raises(ValueError, match="retention_days"):
        RecordWriter(tmp_path, retention_days=0)


def test_verify_and_read_skip_a_torn_tail_and_count_corrupt_lines(tmp_path):
    good = [json.dumps(_rec(i, T0)) for i in range(3)]
    f = tmp_path / "requests-2026-11-30.jsonl"
    f.write_text("\n".join(good) + "\n" + json.dumps(_rec(9, T0))[:40])  # a crash cut the last line
    rep = verify_records(tmp_path)
    assert rep.ok and rep.records == 3 and rep.torn_tails == [f.name]
    assert len(read_records(tmp_path)) == 3
    f.write_text(good[0] + "\n{not json\n" + good[1] + "\n" + good[1] + "\n")
    rep = verify_records(tmp_path)
    assert not rep.ok and rep.corrupt == [(f.name, 2)] and rep.duplicate_ids == 1 and rep.records == 3


def test_export_a_time_range_as_csv_and_parquet(tmp_path):
    w = RecordWriter(tmp_path / "rec", clock=Clock(T0))
    for i, days in enumerate((0, 1, 2, 3)):
        w.write(_rec(i, T0 + dt.timedelta(days=days)))
    since, until = T0 + dt.timedelta(days=1), T0 + dt.timedelta(days=3)
    out, n = export_records(tmp_path / "rec", tmp_path / "x.csv", since, until)
    df = pd.read_csv(out)
    assert n == 2 and list(df["request_id"].map(lambda v: int(str(v), 16) if isinstance(v, str) else v)) == [1, 2]
    assert {"model_name", "input_sha256", "targets", "response_sha256", "latency_ms"} <= set(df.columns)
    w.write({**_rec(9, T0), "input": None, "status": 415})  # a refused upload: no image facts
    out, n = export_records(tmp_path / "rec", tmp_path / "x.parquet")
    df = pd.read_parquet(out)
    assert n == 5 and len(df) == 5 and str(df["input_bytes"].dtype) == "Int64" and df["input_bytes"].isna().sum() == 1
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        export_records(tmp_path / "rec", tmp_path / "x.xlsx")


def test_command_line_verify_and_export(tmp_path):
    folder = tmp_path / "rec"
    w = RecordWriter(folder)
    now = dt.datetime.now(dt.timezone.utc)
    for i in range(5):
        w.write(_rec(i, now))
    w.close()
    cmd = [sys.executable, "-m", "mlflow_projects.serving.records"]
    r = subprocess.run([*cmd, "verify", "--dir", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 records in 1 file(s)" in r.stdout and "OK" in r.stdout
    day = now.date().isoformat()
    out = tmp_path / "period.parquet"
    r = subprocess.run([*cmd, "export", "--dir", str(folder), "--since", day, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 records" in r.stdout and len(pd.read_parquet(out)) == 5
    with open(next(folder.glob("*.jsonl")), "a") as fh:
        fh.write("garbage\n")
    r = subprocess.run([*cmd, "verify", "--dir", str(folder), "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout)["corrupt_lines"][0]["line"] == 6
    r = subprocess.run([*cmd, "verify", "--dir", str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "records folder not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "export", "--dir", str(folder), "--since", "yesterday", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a date or ISO time" in r.stderr


def _asgi(app, path, headers=(), body=b"", on_last_chunk=None):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg):
        if msg["type"] == "http.response.body" and not msg.get("more_body") and on_last_chunk:
            on_last_chunk()
        sent.append(msg)

    scope = {"type": "http", "path": path, "method": "POST", "headers": list(headers), "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"])


def test_middleware_one_record_per_request_written_before_the_answer_leaves(tmp_path):
    async def route(scope, receive, send):
        await receive()
        note_request(b"the uploaded bytes")
        note_response({"model": {"name": "m", "version": "2", "alias": "champion", "uri": "models:/m@champion",
                                 "extra": "dropped"}, "method": "gradcam", "layer": "features.7",
                       "targets": ["Effusion"], "audit_run_id": "run1",
                       "image": {"width": 80, "height": 70, "sha256": "cd" * 32}})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"a":', "more_body": True})
        await send({"type": "http.response.body", "body": b"1}"})

    folder = tmp_path / "rec"
    app = wrap(route, middleware_stack(api_keys=["k"], max_body_bytes=1000, records_dir=str(folder)))
    mp = (b"content-type", b"multipart/form-data; boundary=x")
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="PATIENT-NAME.png"\r\n\r\nabc\r\n--x--\r\n'
    seen_before_answer = []
    status, headers = _asgi(app, "/explain", [mp, (b"authorization", b"Bearer k")], part,
                            on_last_chunk=lambda: seen_before_answer.append(len(read_records(folder))))
    assert status == 200 and seen_before_answer == [1]
    recs = read_records(folder)
    assert recs[0]["request_id"] == headers[b"x-request-id"].decode()
    r = recs[0]
    assert (r["route"], r["status"], r["auth"], r["method"], r["layer"], r["targets"]) == \
        ("/explain", 200, "ok", "gradcam", "features.7", ["Effusion"])
    assert r["model"] == {"name": "m", "version": "2", "alias": "champion", "uri": "models:/m@champion"}
    assert r["input"] == {"sha256": "cd" * 32, "bytes": len(b"the uploaded bytes"), "width": 80, "height": 70}
    import hashlib

    assert r["response_sha256"] == hashlib.sha256(b'{"a":1}').hexdigest() and r["response_bytes"] == 7
    assert "PATIENT-NAME" not in (folder / next(folder.iterdir()).name).read_text()
    # refused before any route ran: recorded with its status and auth outcome
    status, headers = _asgi(app, "/predict", [mp], part)
    assert status == 401 and b"x-request-id" in headers
    status, _ = _asgi(app, "/predict", [(b"authorization", b"Bearer k"), (b"content-type", b"image/png")], b"abc")
    assert status == 415
    status, _ = _asgi(app, "/concepts", [(b"authorization", b"Bearer k")])  # not a recorded route
    recs = read_records(folder)
    assert [(x["route"], x["status"], x["auth"]) for x in recs[1:]] == [("/predict", 401, "missing"),
                                                                      ("/predict", 415, "ok")]
    assert len({x["request_id"] for x in recs}) == 3

    async def refusing(scope, receive, send):  # a route that refuses the image it read (a 400)
        await receive()
        note_request(b"not an image")
        note_response({"error": "cannot decode", "status": 400, "model": None})
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = wrap(refusing, middleware_stack(records_dir=str(folder)))
    assert _asgi(app, "/predict", [mp], part)[0] == 400
    last = read_records(folder)[-1]
    assert last["status"] == 400 and last["input"] == {"bytes": 12, "sha256": hashlib.sha256(b"not an image").hexdigest()}
    assert "_upload" not in last

    async def crashing(scope, receive, send):
        raise RuntimeError("boom")

    app = wrap(crashing, middleware_stack(records_dir=str(folder)))
    with pytest.raises(RuntimeError):
        _asgi(app, "/predict", [mp], part)
    assert read_records(folder)[-1]["status"] == 500
