"""Plain ASGI middlewares of the service, one concern each, in the order :func:`middleware_stack` gives
(outermost first):

1. :class:`AccessLogMiddleware`: one JSON line per request on logger ``cxr.access`` (method, path,
   status, request and response bytes, duration, auth outcome, client address, request id; never bodies,
   file names or headers). Probes are not logged.
1b. :class:`mlflow_projects.serving.records.RecordMiddleware`: the durable per-request record of every
   ``/predict``, ``/explain`` and ``/feedback`` (and the ``X-Request-ID`` header).
2. :class:`AuthMiddleware`: Bearer keys from ``CXR_API_KEYS`` on every route but the probes
   (``/livez``, ``/readyz``, ``/healthz``) and the review page's static files (``/ui``: no data; the page
   sends the key on its own calls); 401 otherwise. No keys: authentication disabled.
3. :class:`BodyLimitMiddleware`: ``CXR_MAX_BODY_BYTES``; 413 from ``Content-Length`` before reading,
   and while streaming for bodies without one; 400 for an invalid ``Content-Length``.
4. :class:`UploadMiddleware`: upload routes take multipart/form-data only (415; ``/feedback`` also
   JSON), not an empty body (400), and only the fields of :data:`ROUTE_FIELDS` (400 naming the valid
   ones; a text or JSON value where a file is expected, e.g. a URL or a path, is refused: the service
   never fetches or opens anything it is pointed at).

The middlewares share one record per request through the ASGI scope (key :data:`ACCESS_RECORD`) so the
access log can say how authentication went without the auth middleware logging.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
from typing import Any, Mapping, Sequence

from mlflow_projects.serving.errors import ServingError

access_log = logging.getLogger("cxr.access")

__all__ = ["AccessLogMiddleware", "AuthMiddleware", "BodyLimitMiddleware", "UploadMiddleware", "middleware_stack",
           "wrap", "check_multipart_fields", "check_json_fields", "ROUTE_FIELDS", "PROBES", "UPLOAD_ROUTES", "PUBLIC_PAGE"]

PROBES = ("/livez", "/readyz", "/healthz")
PUBLIC_PAGE = "/ui"  # the review page's static files (HTML/CSS/JS, no data): served without a key
UPLOAD_ROUTES = ("/predict", "/explain", "/feedback")
# multipart fields each upload route accepts: (file fields, text fields)
ROUTE_FIELDS: dict[str, tuple[frozenset, frozenset]] = {
    "/predict": (frozenset({"image"}), frozenset()),
    "/explain": (frozenset({"image"}), frozenset({"method", "targets", "top_neurons"})),
    "/feedback": (frozenset({"image", "mask"}), frozenset({"finding", "image_sha256", "boxes", "mask_png", "author",
                                                           "judgement", "method"})),
}
ACCESS_RECORD = "cxr.access"  # scope key of the per-request record the access log writes
_DISPOSITION = re.compile(rb'content-disposition:[^\r\n]*?\bname="([^"]*)"([^\r\n]*)', re.IGNORECASE)


def _headers(scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", [])}


def _passes(scope) -> bool:
    """Non-HTTP traffic and probes go through every middleware untouched."""
    return scope["type"] != "http" or scope.get("path", "") in PROBES


async def send_json(send, status: int, body: Mapping[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete JSON response."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def check_multipart_fields(body: bytes, content_type: bytes, route: str) -> None:
    """Check the part names of a multipart body against :data:`ROUTE_FIELDS` (part headers only).

    Args:
        body: the whole request body.
        content_type: the ``Content-Type`` header (with its boundary).
        route: one of :data:`ROUTE_FIELDS`.

    Raises:
        ServingError: (400) unknown field, a text value for a file field, or a malformed body.
    """
    files, texts = ROUTE_FIELDS[route]
    m = re.search(rb'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ServingError(400, "multipart/form-data request without a boundary")
    delimiter = b"--" + m.group(1)
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break  # closing delimiter
        head = part.split(b"\r\n\r\n", 1)[0]
        d = _DISPOSITION.search(head)
        if d is None:
            raise ServingError(400, "malformed multipart part (no Content-Disposition name)")
        name, rest = d.group(1).decode("utf-8", "replace"), d.group(2)
        is_file = b"filename=" in rest.lower()
        if name not in files | texts:
            raise ServingError(400, f"unknown form field {name[:40]!r} for {route}; valid: {sorted(files | texts)}",
                               valid=sorted(files | texts))
        if name in files and not is_file:
            raise ServingError(400, f"field {name!r} must be a file upload (multipart part with a filename), "
                                    "not a text value")


def check_json_fields(body: bytes, route: str) -> None:
    """Check a JSON request body: an object whose keys are text fields of :data:`ROUTE_FIELDS`.

    File fields (``image``, ``mask``) cannot come as JSON: a string there would name a path or URL for the
    server to open, which the service never does; send them as multipart file parts.

    Raises:
        ServingError: (400) not a JSON object, an unknown key, or a file field.
    """
    files, texts = ROUTE_FIELDS[route]
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServingError(400, f"the JSON body cannot be parsed ({exc.__class__.__name__}): send a JSON object "
                                f"with fields {sorted(texts)}", valid=sorted(texts)) from None
    if not isinstance(data, dict):
        raise ServingError(400, f"the JSON body must be an object with fields {sorted(texts)}", valid=sorted(texts))
    for name in data:
        if name in files:
            raise ServingError(400, f"field {name!r} must be a file upload (multipart/form-data part with a "
                                    "filename), not a JSON value")
        if name not in texts:
            raise ServingError(400, f"unknown field {str(name)[:40]!r} for {route}; valid: {sorted(texts)}",
                               valid=sorted(texts))


class AccessLogMiddleware:
    """One JSON access-log line per non-probe request (logger ``cxr.access``).

    Args:
        app: the wrapped ASGI app.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if _passes(scope):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        record = {"status": 0, "read": 0, "out": 0, "auth": "disabled"}
        declared = _headers(scope).get(b"content-length", b"")
        declared_n = int(declared) if declared.isdigit() else 0

        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                record["read"] += len(message.get("body", b""))
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            elif message["type"] == "http.response.body":
                record["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app({**scope, ACCESS_RECORD: record}, counting_receive, counting_send)
        finally:
            access_log.info(json.dumps({
                "event": "access", "method": scope.get("method", ""), "path": scope.get("path", ""),
                "status": record["status"], "request_bytes": max(declared_n, record["read"]),
                "response_bytes": record["out"], "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                "auth": record["auth"], "client": (scope.get("client") or [None])[0],
                "request_id": record.get("request_id")}))


class AuthMiddleware:
    """Bearer-key authentication on every route but the probes.

    Args:
        app: the wrapped ASGI app.
        api_keys: accepted keys; empty disables authentication.
    """

    def __init__(self, app, api_keys: Sequence[str] = ()) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]

    def authorise(self, headers: Mapping[bytes, bytes]) -> str:
        """``"disabled"``, ``"missing"``, ``"invalid"`` or ``"ok"`` (keys compared in constant time, all of them)."""
        if not self.keys:
            return "disabled"
        auth = headers.get(b"authorization", b"")
        if not auth.lower().startswith(b"bearer "):
            return "missing"
        token = auth[7:].strip()
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token, key)
        return "ok" if ok else "invalid"

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if _passes(scope) or (scope.get("method") in ("GET", "HEAD")
                              and (path == PUBLIC_PAGE or path.startswith(PUBLIC_PAGE + "/"))):
            await self.app(scope, receive, send)
            return
        outcome = self.authorise(_headers(scope))
        if ACCESS_RECORD in scope:
            scope[ACCESS_RECORD]["auth"] = outcome
        if outcome in ("missing", "invalid"):
            await send_json(send, 401, {"error": "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                        "status": 401}, [(b"www-authenticate", b'Bearer realm="cxr"')])
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Request bodies above ``max_body_bytes`` get 413, declared or streamed.

    Args:
        app: the wrapped ASGI app.
        max_body_bytes: the limit (``CXR_MAX_BODY_BYTES``).
    """

    def __init__(self, app, max_body_bytes: int = 128 * 1024 * 1024) -> None:
        self.app = app
        self.max_body = int(max_body_bytes)

    def _too_large(self, n: int | None = None) -> dict[str, Any]:
        size = f"request body of {n} bytes" if n is not None else "request body"
        return {"error": f"{size} exceeds the limit of {self.max_body} bytes (CXR_MAX_BODY_BYTES)", "status": 413}

    async def __call__(self, scope, receive, send) -> None:
        if _passes(scope):
            await self.app(scope, receive, send)
            return
        length = _headers(scope).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n < 0:
                await send_json(send, 400, {"error": "invalid Content-Length", "status": 400})
                return
            if n > self.max_body:
                await send_json(send, 413, self._too_large(n))
                return
        state = {"received": 0, "too_large": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:
                    state["too_large"] = True
                    return {"type": "http.disconnect"}  # the app stops reading; we answer 413 below
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, tracking_send)
        if state["too_large"] and not state["started"]:
            await send_json(send, 413, self._too_large())


class UploadMiddleware:
    """Upload routes (``POST`` :data:`UPLOAD_ROUTES`) take non-empty multipart/form-data with their own fields.

    ``/feedback`` also takes ``application/json`` with its text fields only (:func:`check_json_fields`).
    The body is read whole (the body limit applies while reading), its field names are checked, then
    it is replayed to the app.

    Args:
        app: the wrapped ASGI app.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if _passes(scope) or scope.get("method") != "POST" or path not in UPLOAD_ROUTES:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        length = headers.get(b"content-length")
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if length == b"0" or (not ctype and length is None and b"transfer-encoding" not in headers):
            await send_json(send, 400, {"error": "empty body: send multipart/form-data with the image in field 'image'",
                                        "status": 400})
            return
        allowed = (b"multipart/form-data", b"application/json") if path == "/feedback" else (b"multipart/form-data",)
        if ctype not in allowed:
            await send_json(send, 415, {"error": f"unsupported request type {ctype.decode(errors='replace')!r}: send "
                                                 "multipart/form-data with the image file in field 'image'",
                                        "status": 415, "valid": [a.decode() for a in allowed]})
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away, or the body limit stopped the read (it answers 413)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            if ctype == b"multipart/form-data":
                check_multipart_fields(body, headers.get(b"content-type", b""), path)
            else:
                check_json_fields(body, path)
        except ServingError as exc:
            await send_json(send, exc.status, exc.to_dict())
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def middleware_stack(api_keys: Sequence[str] = (), max_body_bytes: int = 128 * 1024 * 1024,
                     records_dir: str | None = None, records_retention_days: int = 183) -> list[tuple[type, dict]]:
    """The service's middlewares with their options, outermost first (the order BentoML's
    ``add_asgi_middleware`` and Starlette apply them in).

    Args:
        api_keys: ``CXR_API_KEYS``.
        max_body_bytes: ``CXR_MAX_BODY_BYTES``.
        records_dir: ``CXR_RECORDS_DIR`` (None: ``<project>/records``).
        records_retention_days: ``CXR_RECORDS_RETENTION_DAYS``.
    """
    from mlflow_projects.serving.records import RecordMiddleware

    return [(AccessLogMiddleware, {}),
            (RecordMiddleware, {"folder": records_dir, "retention_days": records_retention_days}),
            (AuthMiddleware, {"api_keys": tuple(api_keys)}),
            (BodyLimitMiddleware, {"max_body_bytes": max_body_bytes}), (UploadMiddleware, {})]


def wrap(app, stack: Sequence[tuple[type, dict]]):
    """Apply a :func:`middleware_stack` to an ASGI app (first entry outermost), as the server does."""
    for cls, options in reversed(list(stack)):
        app = cls(app, **options)
    return app
