"""The review page: plain HTML/CSS/JS files in ``mlflow_projects/serving/ui/`` (package data, no build step,
no CDN) served by the service under ``/ui``.

The page calls the service's own ``/predict``, ``/explain`` and ``/feedback`` from the browser (same origin),
with the API key typed into the page (kept in ``sessionStorage``) when the service has keys. The files
themselves hold no data, so :class:`~mlflow_projects.serving.middleware.AuthMiddleware` serves them without a
key. Every answer carries a Content-Security-Policy that allows only the page's own files, its own origin
and ``data:``/``blob:`` images (the PNGs the service sends as base64).

Example:
    >>> app = review_app()          # mounted by service.py: @bentoml.asgi_app(review_app(), path="/ui")
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["UI_DIR", "UI_FILES", "SECURITY_HEADERS", "review_app"]

UI_DIR = Path(__file__).with_name("ui")
UI_FILES = ("index.html", "review.css", "review.js")  # everything the page needs
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                               "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


class _Headers:
    """Adds :data:`SECURITY_HEADERS` to every response of the wrapped ASGI app."""

    def __init__(self, app) -> None:
        self.app = app
        self.extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send) -> None:
        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *[(k, v) for k, v in self.extra if k not in names]]}
            await send(message)

        await self.app(scope, receive, with_headers)


def review_app(folder: str | Path | None = None):
    """The ASGI app of the page: the files of ``folder`` (default :data:`UI_DIR`), ``index.html`` at its root.

    Args:
        folder: the page's files (tests may point elsewhere).

    Returns:
        A Starlette app (GET / HEAD only: anything else gets 405).

    Raises:
        FileNotFoundError: a file of :data:`UI_FILES` is missing (a broken install, e.g. without package data).
    """
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    folder = Path(folder) if folder else UI_DIR
    missing = [name for name in UI_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"review page files {missing} missing in {folder} (package data not installed?)")
    files = StaticFiles(directory=str(folder), html=True)  # raises HTTPException(404): Starlette answers it
    return _Headers(Starlette(routes=[Mount("/", app=files)]))
