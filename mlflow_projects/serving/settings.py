"""Service settings: :class:`ServeConfig` read from the ``CXR_*`` environment, and the start-up check
that refuses to expose an unauthenticated service beyond this machine (:func:`check_bind_address`).

Where the service binds. BentoML 1.4 takes the address, highest priority first, from ``bentoml serve
--host`` (click also reads it from ``BENTOML_HOST``), then the service's own config (``http.host`` of
``@bentoml.service``, here :data:`DEFAULT_HOST`), then BentoML's default ``0.0.0.0``. ``--host`` is handed
to BentoML's ``serve_http`` as an argument and never written back to the environment or the config, so
the only place that sees it is the ``bentoml serve`` process itself, which imports ``service.py`` before
it binds: :func:`requested_host` reads ``--host`` from that process's command line, else
``BENTOML_HOST``, else the default, and ``service.py`` calls :func:`check_bind_address` at import, so a
refused configuration stops ``bentoml serve`` before any socket is opened.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["ServeConfig", "DEFAULT_MODEL_URI", "DEFAULT_HOST", "DEFAULT_MIN_IMAGE_SIDE", "UnsafeBindError", "available_cores",
           "requested_host", "is_loopback", "check_bind_address"]

DEFAULT_MODEL_URI = "models:/cxr-classifier@champion"
DEFAULT_HOST = "127.0.0.1"  # the service's http.host: loopback unless told otherwise (--host / BENTOML_HOST)
DEFAULT_MIN_IMAGE_SIDE = 64  # px: smaller uploads get 400 (the phantom and the audits use >= 64 px images)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env_int(name: str, default: int, minimum: int = 0, environ: Mapping[str, str] | None = None) -> int:
    text = (os.environ if environ is None else environ).get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_bool(name: str, environ: Mapping[str, str] | None = None) -> bool:
    text = (os.environ if environ is None else environ).get(name, "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{name} must be 1 or 0 (true/false), got {text!r}")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class ServeConfig:
    """Service settings (from the environment with :meth:`from_env`)."""

    model_uri: str = DEFAULT_MODEL_URI  # CXR_MODEL_URI
    tracking_uri: str | None = None  # MLFLOW_TRACKING_URI (None: mlflow_projects.common default)
    max_pixels: int = 50_000_000  # CXR_MAX_PIXELS: larger images get 413
    min_image_side: int = DEFAULT_MIN_IMAGE_SIDE  # CXR_MIN_IMAGE_SIDE: images with a shorter side get 400
    max_body_bytes: int = 128 * 1024 * 1024  # CXR_MAX_BODY_BYTES: larger requests get 413
    api_keys: tuple[str, ...] = ()  # CXR_API_KEYS (comma-separated); empty = no auth
    allow_anonymous: bool = False  # CXR_ALLOW_ANONYMOUS=1: serve without keys on a non-loopback address
    cache_size: int = 512  # CXR_CACHE_SIZE: explanation entries kept (0 disables)
    workers: int = 1  # CXR_WORKERS: BentoML worker processes
    threads: int = 0  # CXR_THREADS: ONNX Runtime / torch threads per worker (0 = cores / workers)
    max_batch: int = 16  # CXR_MAX_BATCH: micro-batch size bound
    batch_wait_ms: int = 0  # CXR_BATCH_WAIT_MS: extra wait for a batch to fill (0 = none)
    batch_inflight: int = 1  # CXR_BATCH_INFLIGHT: micro-batches running at once (>= 1)
    overlay_max_side: int = 1024  # CXR_OVERLAY_MAX_SIDE: overlay PNG side bound (aspect kept)
    top_neurons: int = 5  # default k of top units
    feedback_dir: str | None = None  # CXR_FEEDBACK_DIR
    records_dir: str | None = None  # CXR_RECORDS_DIR: per-request records (default <project>/records)
    records_retention_days: int = 183  # CXR_RECORDS_RETENTION_DAYS: record files older than this are removed
    cache_dir: str | None = None  # CXR_SERVE_CACHE: where registry artifacts are downloaded
    # A model already on disk (a Bento's model, see mlflow_projects.serving.startup): its folder holds the
    # MLflow model under ``mlflow_model/`` and optionally ``audit/`` (concepts.parquet, summary.json, ood.npz);
    # ``local_identity`` gives its MLflow name/version/alias/audit_run_id. The registry is then never contacted.
    local_model_dir: str | None = None
    local_identity: dict[str, Any] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ServeConfig":
        """Read the ``CXR_*`` variables (see the field comments).

        Args:
            environ: the variables (default ``os.environ``).

        Raises:
            ValueError: a bad value, naming the variable.
        """
        env = os.environ if environ is None else environ
        keys = tuple(k.strip() for k in env.get("CXR_API_KEYS", "").split(",") if k.strip())
        return cls(model_uri=env.get("CXR_MODEL_URI") or DEFAULT_MODEL_URI,
                   tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
                   max_pixels=_env_int("CXR_MAX_PIXELS", 50_000_000, 1, env),
                   min_image_side=_env_int("CXR_MIN_IMAGE_SIDE", DEFAULT_MIN_IMAGE_SIDE, 1, env),
                   max_body_bytes=_env_int("CXR_MAX_BODY_BYTES", 128 * 1024 * 1024, 1, env),
                   api_keys=keys, allow_anonymous=_env_bool("CXR_ALLOW_ANONYMOUS", env),
                   cache_size=_env_int("CXR_CACHE_SIZE", 512, 0, env),
                   workers=_env_int("CXR_WORKERS", 1, 1, env), threads=_env_int("CXR_THREADS", 0, 0, env),
                   max_batch=_env_int("CXR_MAX_BATCH", 16, 1, env),
                   batch_wait_ms=_env_int("CXR_BATCH_WAIT_MS", 0, 0, env),
                   batch_inflight=_env_int("CXR_BATCH_INFLIGHT", 1, 1, env),
                   overlay_max_side=_env_int("CXR_OVERLAY_MAX_SIDE", 1024, 8, env),
                   feedback_dir=env.get("CXR_FEEDBACK_DIR") or None,
                   records_dir=env.get("CXR_RECORDS_DIR") or None,
                   records_retention_days=_env_int("CXR_RECORDS_RETENTION_DAYS", 183, 1, env),
                   cache_dir=env.get("CXR_SERVE_CACHE") or None)

    @property
    def intra_op_threads(self) -> int:
        """ONNX Runtime / torch threads of one worker: ``CXR_THREADS`` or cores / workers."""
        return self.threads or max(1, available_cores() // max(1, self.workers))


# ---- where the service binds ------------------------------------------------------------------------
class UnsafeBindError(ValueError):
    """The service would listen beyond this machine without API keys."""


def requested_host(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                   default: str = DEFAULT_HOST) -> str:
    """The address ``bentoml serve`` will bind (see the module docstring for BentoML's precedence).

    Args:
        argv: the command line of this process (default ``sys.argv``); ``--host X`` or ``--host=X`` after
            a ``serve`` command wins.
        environ: the environment (default ``os.environ``); ``BENTOML_HOST`` comes next.
        default: the service's own ``http.host``.

    Returns:
        The host as given (an IP address for BentoML 1.4).

    Example:
        >>> requested_host(["bentoml", "serve", "service:CXRExplainer", "--host", "0.0.0.0"], {})
        '0.0.0.0'
        >>> requested_host(["pytest"], {"BENTOML_HOST": "::"})
        '::'
    """
    import sys

    args = list(sys.argv if argv is None else argv)
    env = os.environ if environ is None else environ
    if any(a in ("serve", "serve-http") for a in args):
        for i, arg in enumerate(args):
            if arg == "--host" and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith("--host="):
                return arg.split("=", 1)[1]
    return env.get("BENTOML_HOST") or default


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for anything else,
    including the wildcards ``0.0.0.0`` and ``::`` and unparseable names."""
    text = str(host).strip().strip("[]")
    if text.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, api_keys: Sequence[str], allow_anonymous: bool = False) -> None:
    """Refuse to serve on a non-loopback address without API keys (unless anonymity is asked for).

    Args:
        host: the address the service will bind (:func:`requested_host`).
        api_keys: the configured Bearer keys (``CXR_API_KEYS``).
        allow_anonymous: ``CXR_ALLOW_ANONYMOUS=1``: serve without keys on purpose.

    Raises:
        UnsafeBindError: ``host`` is not loopback, no key is set and anonymity was not allowed; the
            message names ``CXR_API_KEYS``, ``CXR_ALLOW_ANONYMOUS`` and ``--host``/``BENTOML_HOST``.

    Example:
        >>> check_bind_address("127.0.0.1", ())                  # loopback: keys optional
        >>> check_bind_address("0.0.0.0", ("k",))                # exposed, with keys
        >>> check_bind_address("0.0.0.0", (), allow_anonymous=True)
    """
    if is_loopback(host) or any(k for k in api_keys) or allow_anonymous:
        return
    raise UnsafeBindError(
        f"refusing to serve on {host} (not a loopback address) without API keys: set CXR_API_KEYS=<key>[,<key>...] "
        f"(clients send 'Authorization: Bearer <key>'), or bind {DEFAULT_HOST} (--host / BENTOML_HOST), or set "
        f"CXR_ALLOW_ANONYMOUS=1 to serve anonymously on purpose")
