"""A record of every request the service answers on ``/predict``, ``/explain`` and ``/feedback``
(record-keeping in the sense of EU AI Act Article 12: what was asked, of which model and audit, and what
came back, with the time).

One JSON line per request, in files rotated daily (UTC) in a folder (``CXR_RECORDS_DIR``, default
``<project>/records``): ``requests-YYYY-MM-DD.jsonl``. A record::

    {"schema": 1, "time": "2026-11-30T18:40:00.123456Z", "request_id": "<uuid4 hex>", "route": "/explain",
     "status": 200, "latency_ms": 41.2, "auth": "ok",
     "model": {"name": "cxr-classifier", "version": "3", "alias": "champion", "uri": "models:/..."},
     "audit_run_id": "<run id>", "audit_status": "passed", "method": "gradcam", "layer": "features.7",
     "targets": ["Effusion"], "input": {"sha256": "<hex of the uploaded bytes>", "bytes": 52811,
     "width": 1024, "height": 1024}, "response_sha256": "<hex of the body sent>", "response_bytes": 90311,
     "feedback_id": null}

Never PHI: no DICOM header field, no client file name, no free text from the client (a feedback's
``author`` is not copied), no error message (it may echo client input); the image is known only by the
SHA-256 of its bytes and its size. The request id is generated here (a client's ``X-Request-ID`` is not
trusted) and returned in the ``X-Request-ID`` response header.

Durability. A record is one ``os.write`` of one complete line to a file opened with ``O_APPEND`` (no
buffering in this process), made *before* the last chunk of the response is passed on: a client that
received an answer has its record in the kernel, so killing the server (SIGKILL included) loses only
requests still in flight, and several worker processes append whole lines to the same file. A machine
crash can still cut the last line short; readers skip a final line without its newline (a torn tail,
reported by :func:`verify_records`) and any line that is not a JSON object is counted as corrupt.

Retention: files whose date is older than ``CXR_RECORDS_RETENTION_DAYS`` (default 183 days, six months:
Article 19(1)/26(6)'s minimum for deployers' logs) are removed when the writer starts and when the day
changes; nothing else in the folder is touched.

Command line (for compliance officers)::

    python -m mlflow_projects.serving.records verify --dir records
    python -m mlflow_projects.serving.records export --dir records --since 2026-11-01 --until 2026-12-01 \\
        --out november.csv            # or .parquet
"""
from __future__ import annotations

import argparse
import contextvars
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

__all__ = ["RecordWriter", "RecordMiddleware", "RecordsReport", "SCHEMA", "RECORDED_ROUTES", "DEFAULT_RETENTION_DAYS",
           "default_records_dir", "served_identity", "current_record", "note_request", "note_response", "read_records",
           "verify_records", "export_records", "record_files", "set_identity_source", "main"]

SCHEMA = 1
RECORDED_ROUTES = ("/predict", "/explain", "/feedback")
DEFAULT_RETENTION_DAYS = 183
REQUEST_ID_HEADER = b"x-request-id"
_FILE = re.compile(r"^requests-(\d{4}-\d{2}-\d{2})\.jsonl$")
# the record of the request being handled (set by RecordMiddleware, filled by the routes)
_CURRENT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cxr_request_record", default=None)
_IDENTITY: list[Callable[[], Mapping[str, Any]]] = []  # what is served, for records the routes never saw


def default_records_dir() -> Path:
    """``CXR_RECORDS_DIR`` or ``<project>/records``."""
    from mlflow_projects.common import PROJECT_ROOT

    env = os.environ.get("CXR_RECORDS_DIR")
    return Path(env) if env else PROJECT_ROOT / "records"


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _stamp(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_files(folder: str | os.PathLike) -> list[tuple[_dt.date, Path]]:
    """The daily record files of a folder, oldest first (other files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _FILE.match(p.name)
        if m and p.is_file():
            try:
                out.append((_dt.date.fromisoformat(m.group(1)), p))
            except ValueError:
                continue
    return sorted(out)


# ---- writing ------------------------------------------------------------------------------------
class RecordWriter:
    """Appends records as whole lines to the file of their UTC day; prunes files past the retention.

    Args:
        folder: where the files go (created when missing).
        retention_days: files dated more than this many days before today are removed (>= 1).
        clock: returns the current UTC time (tests pass a fixed one).
    """

    def __init__(self, folder: str | os.PathLike, retention_days: int = DEFAULT_RETENTION_DAYS,
                 clock: Callable[[], _dt.datetime] = _utc_now) -> None:
        if int(retention_days) < 1:
            raise ValueError(f"retention_days must be >= 1, got {retention_days!r}")
        self.folder = Path(folder)
        self.retention_days = int(retention_days)
        self.clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._day: _dt.date | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pruned_on = self.clock().date()
        self.prune(self._pruned_on)

    def path_for(self, day: _dt.date) -> Path:
        return self.folder / f"requests-{day.isoformat()}.jsonl"

    def prune(self, today: _dt.date | None = None) -> list[Path]:
        """Remove the record files dated before ``today - retention_days``; returns what was removed."""
        today = today or self.clock().date()
        cutoff = today - _dt.timedelta(days=self.retention_days)
        removed = []
        for day, path in record_files(self.folder):
            if day < cutoff:
                try:
                    path.unlink()
                    removed.append(path)
                except FileNotFoundError:  # another worker removed it first
                    pass
        if removed:
            log.info("records: removed %d file(s) older than %d days (%s .. %s)", len(removed), self.retention_days,
                     removed[0].name, removed[-1].name)
        return removed

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record (one ``os.write`` of one line) to the file of its ``time``'s UTC day."""
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=True, default=str) + "\n").encode()
        day = _dt.date.fromisoformat(str(record["time"])[:10])
        with self._lock:
            if day != self._day:
                if self._fd is not None:
                    os.close(self._fd)
                self._fd = os.open(self.path_for(day), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                self._day = day
                if day > self._pruned_on:  # a new day: the retention moves on
                    self._pruned_on = day
                    self.prune(day)
            n = os.write(self._fd, line)
            if n != len(line):  # a regular file takes the whole line or fails (disk full): never half a record
                raise OSError(f"short write to {self.path_for(day)} ({n} of {len(line)} bytes)")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                self._day = None


# ---- what the routes add ----------------------------------------------------------------------------
def set_identity_source(source: Callable[[], Mapping[str, Any]]) -> None:
    """Register how to read what is served now (``{model, audit_run_id, audit_status}``): used for the
    records of requests refused before a route ran (401, 413, 415). The service calls it once."""
    _IDENTITY[:] = [source]


def served_identity(core) -> dict[str, Any]:
    """``{model, audit_run_id, audit_status}`` of what an :class:`ExplanationService` serves now ({} while
    it loads)."""
    m = getattr(core, "model", None)
    if m is None:
        return {}
    return {"model": m.identity.public(), "audit_run_id": m.audit_run_id, "audit_status": m.audit_status}


def current_record() -> dict | None:
    """The record of the request being handled, or None outside one."""
    return _CURRENT.get()


def note_request(data: bytes | None) -> None:
    """Record the uploaded image's size; its SHA-256 (of the bytes as sent, nothing of their content) comes
    from the response, which computed it already, or is computed when the record is written (a refused image)."""
    rec = _CURRENT.get()
    if rec is not None and data is not None:
        rec["input"] = {**(rec.get("input") or {}), "bytes": len(data)}
        rec["_upload"] = data


def note_response(body: Mapping[str, Any]) -> None:
    """Copy the served facts of a response body into the request's record: model, audit run and status,
    method, layer, targets, image size, feedback id. Only fields the service itself produced."""
    rec = _CURRENT.get()
    if rec is None or not isinstance(body, Mapping):
        return
    if isinstance(body.get("model"), Mapping):
        rec["model"] = {k: body["model"].get(k) for k in ("name", "version", "alias", "uri")}
    for key in ("audit_run_id", "audit_status", "method", "layer"):
        if body.get(key) is not None:
            rec[key] = body[key]
    if body.get("targets") is not None:
        rec["targets"] = list(body["targets"])
    image = body.get("image")
    if isinstance(image, Mapping) and image.get("sha256"):
        rec["input"] = {**(rec.get("input") or {}), "sha256": image["sha256"],
                        "width": image.get("width"), "height": image.get("height")}
    if rec.get("route") == "/feedback" and body.get("id"):
        rec["feedback_id"] = body["id"]
        if body.get("image_sha256"):
            rec["input"] = {**(rec.get("input") or {}), "sha256": body["image_sha256"]}


class RecordMiddleware:
    """Writes one record per request on :data:`RECORDED_ROUTES` (every outcome: refused, failed or
    answered) and returns its id in ``X-Request-ID``. Just inside the access log (which then logs the
    request id too) and outside authentication and the upload checks, so their refusals are recorded.

    Args:
        app: the wrapped ASGI app.
        folder: the records folder (default :func:`default_records_dir`).
        retention_days: ``CXR_RECORDS_RETENTION_DAYS``.
    """

    def __init__(self, app, folder: str | os.PathLike | None = None,
                 retention_days: int = DEFAULT_RETENTION_DAYS) -> None:
        self.app = app
        self.folder = Path(folder) if folder else default_records_dir()
        self.retention_days = retention_days
        self._writer: RecordWriter | None = None

    @property
    def writer(self) -> RecordWriter:
        if self._writer is None:  # in the worker process, at its first request
            self._writer = RecordWriter(self.folder, self.retention_days)
        return self._writer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path", "") not in RECORDED_ROUTES:
            await self.app(scope, receive, send)
            return
        writer = self.writer
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        record: dict[str, Any] = {
            "schema": SCHEMA, "time": _stamp(writer.clock()), "request_id": request_id, "route": scope["path"],
            "http_method": scope.get("method", ""), "status": None, "latency_ms": None, "auth": None,
            "model": None, "audit_run_id": None, "audit_status": None, "method": None, "layer": None,
            "targets": None, "input": None, "response_sha256": None, "response_bytes": 0, "feedback_id": None}
        digest = hashlib.sha256()
        written = False

        def finish(status: int | None) -> None:
            nonlocal written
            if written:
                return
            written = True
            if _IDENTITY:  # what is served now, for what the route did not say (or a refusal before it)
                try:
                    record.update({k: v for k, v in dict(_IDENTITY[0]()).items() if record.get(k) is None})
                except Exception:  # noqa: BLE001 - the record must still be written
                    pass
            upload = record.pop("_upload", None)
            if upload is not None and not (record.get("input") or {}).get("sha256"):
                record["input"] = {**record["input"], "sha256": hashlib.sha256(upload).hexdigest()}
            access = scope.get("cxr.access") or {}
            record["auth"] = record["auth"] or access.get("auth")
            record["status"] = status if status is not None else record["status"]
            record["latency_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            record["response_sha256"] = digest.hexdigest() if record["response_bytes"] else None
            try:
                writer.write(record)
            except OSError as exc:  # the answer still goes out; the failure is loud in the log
                log.error("records: could not write the record of request %s: %s", request_id, exc)

        async def recording_send(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER, request_id.encode())]}
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                digest.update(chunk)
                record["response_bytes"] += len(chunk)
                if not message.get("more_body", False):
                    finish(record["status"])  # before the last chunk leaves: an answered request has its record
            await send(message)

        token = _CURRENT.set(record)
        if isinstance(scope.get("cxr.access"), dict):
            scope["cxr.access"]["request_id"] = request_id
        try:
            await self.app(scope, receive, recording_send)
        except BaseException:
            finish(500 if record["status"] is None else record["status"])
            raise
        finally:
            _CURRENT.reset(token)
        if not written:  # the client went away before the answer was complete
            finish(record["status"] if record["status"] is not None else 499)


# ---- reading ------------------------------------------------------------------------------------
@dataclass
class RecordsReport:
    """What :func:`verify_records` found."""

    folder: str
    files: list[dict[str, Any]] = field(default_factory=list)  # {file, records, corrupt, torn_tail}
    records: int = 0
    corrupt: list[tuple[str, int]] = field(default_factory=list)  # (file, line number)
    torn_tails: list[str] = field(default_factory=list)
    duplicate_ids: int = 0

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.duplicate_ids

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "ok": self.ok, "records": self.records, "files": self.files,
                "corrupt_lines": [{"file": f, "line": n} for f, n in self.corrupt], "torn_tails": self.torn_tails,
                "duplicate_request_ids": self.duplicate_ids}


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line, complete) for each line; the last one is incomplete without its newline."""
    data = path.read_bytes()
    if not data:
        return
    parts = data.split(b"\n")
    last_complete = data.endswith(b"\n")
    if last_complete:
        parts = parts[:-1]
    for i, line in enumerate(parts, 1):
        yield i, line, last_complete or i < len(parts)


def _parse(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and "request_id" in rec and "time" in rec else None


def read_records(folder: str | os.PathLike, since: _dt.datetime | None = None,
                 until: _dt.datetime | None = None) -> list[dict[str, Any]]:
    """The records of a folder with ``since <= time < until`` (UTC), oldest file first, in file order.
    Corrupt lines and a torn tail are skipped (:func:`verify_records` reports them)."""
    out = []
    for day, path in record_files(folder):
        if since is not None and day < since.date():
            continue
        if until is not None and day > until.date():
            continue
        for _, line, complete in _lines(path):
            rec = _parse(line) if complete else None
            if rec is None:
                continue
            t = _parse_time(rec["time"])
            if (since is None or t >= since) and (until is None or t < until):
                out.append(rec)
    return out


def verify_records(folder: str | os.PathLike) -> RecordsReport:
    """Check every record file: each complete line a record, request ids unique; count them."""
    report = RecordsReport(str(Path(folder).resolve()))
    seen: set[str] = set()
    for _, path in record_files(folder):
        n = bad = 0
        torn = False
        for i, line, complete in _lines(path):
            if not complete:
                torn = True
                report.torn_tails.append(path.name)
                continue
            rec = _parse(line)
            if rec is None:
                bad += 1
                report.corrupt.append((path.name, i))
                continue
            n += 1
            if rec["request_id"] in seen:
                report.duplicate_ids += 1
            seen.add(rec["request_id"])
        report.files.append({"file": path.name, "records": n, "corrupt": bad, "torn_tail": torn})
        report.records += n
    return report


_FLAT = ("time", "request_id", "route", "http_method", "status", "latency_ms", "auth", "model_name", "model_version",
         "model_alias", "model_uri", "audit_run_id", "audit_status", "method", "layer", "targets", "input_sha256",
         "input_bytes", "input_width", "input_height", "response_sha256", "response_bytes", "feedback_id")


def _flatten(rec: Mapping[str, Any]) -> dict[str, Any]:
    model = rec.get("model") or {}
    inp = rec.get("input") or {}
    row = {k: rec.get(k) for k in _FLAT}
    row.update({"model_name": model.get("name"), "model_version": model.get("version"),
                "model_alias": model.get("alias"), "model_uri": model.get("uri"),
                "targets": json.dumps(rec["targets"]) if rec.get("targets") is not None else None,
                "input_sha256": inp.get("sha256"), "input_bytes": inp.get("bytes"),
                "input_width": inp.get("width"), "input_height": inp.get("height")})
    return row


def export_records(folder: str | os.PathLike, out: str | os.PathLike, since: _dt.datetime | None = None,
                   until: _dt.datetime | None = None) -> tuple[Path, int]:
    """Write the records of a time range as one flat table (``.csv`` or ``.parquet``, by ``out``'s suffix).

    Returns:
        The file and the number of records in it.
    """
    import pandas as pd

    out = Path(out)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise ValueError(f"export file must end in .csv or .parquet, got {out.name!r}")
    rows = [_flatten(r) for r in read_records(folder, since, until)]
    df = pd.DataFrame(rows, columns=list(_FLAT))
    for col in ("status", "input_bytes", "input_width", "input_height", "response_bytes"):
        df[col] = df[col].astype("Int64")  # integers stay integers where a refused request has none
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        df.to_csv(out, index=False)
    else:
        df.to_parquet(out, index=False)
    return out, len(df)


def _parse_time(text: str) -> _dt.datetime:
    """A record time, a date (``2026-11-30``: midnight UTC) or an ISO time (naive means UTC)."""
    s = str(text).strip()
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    try:
        t = _dt.datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"not a date or ISO time: {text!r} (e.g. 2026-11-30 or 2026-11-30T18:00:00Z)") from None
    return t.replace(tzinfo=_dt.timezone.utc) if t.tzinfo is None else t.astimezone(_dt.timezone.utc)


# ---- command line -----------------------------------------------------------------------------------
def _time_arg(text: str) -> _dt.datetime:
    try:
        return _parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlflow_projects.serving.records",
                                description="Verify or export the service's per-request records.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="count the records, find corrupt lines and torn tails (exit 1 if corrupt)")
    v.add_argument("--dir", default=None, help="records folder (default CXR_RECORDS_DIR or <project>/records)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    e = sub.add_parser("export", help="write the records of a time range as CSV or Parquet")
    e.add_argument("--dir", default=None, help="records folder (default CXR_RECORDS_DIR or <project>/records)")
    e.add_argument("--since", type=_time_arg, default=None, help="from this UTC date/time (inclusive)")
    e.add_argument("--until", type=_time_arg, default=None, help="up to this UTC date/time (exclusive)")
    e.add_argument("--out", required=True, help="output file, .csv or .parquet")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    folder = Path(a.dir).expanduser() if a.dir else default_records_dir()
    if not folder.is_dir():
        print(f"error: records folder not found: {folder.resolve()}", file=sys.stderr)
        return 2
    if a.command == "verify":
        report = verify_records(folder)
        if a.json:
            print(json.dumps(report.to_dict(), indent=1))
        else:
            for f in report.files:
                flags = (f", {f['corrupt']} corrupt line(s)" if f["corrupt"] else "") + \
                        (", torn last line (skipped)" if f["torn_tail"] else "")
                print(f"{f['file']}: {f['records']} records{flags}")
            print(f"{report.records} records in {len(report.files)} file(s) under {folder.resolve()}: "
                  + ("OK" if report.ok else f"NOT OK ({len(report.corrupt)} corrupt line(s), "
                                            f"{report.duplicate_ids} duplicate request id(s))"))
        return 0 if report.ok else 1
    if a.since and a.until and a.since >= a.until:
        print(f"error: --since ({_stamp(a.since)}) must be before --until ({_stamp(a.until)})", file=sys.stderr)
        return 2
    try:
        out, n = export_records(folder, a.out, a.since, a.until)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{n} records -> {out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
