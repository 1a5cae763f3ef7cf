"""Durable, append-only store of clinician feedback (boxes or masks for an image and a finding).

One JSON file per record in a folder (``CXR_FEEDBACK_DIR``, default ``<project>/feedback``), in the
format :mod:`training.dwarf.supervision` reads (``load_feedback`` / ``FeedbackDataset``)::

    {"id": "<uuid4 hex>", "image_sha256": "<hex of the uploaded bytes>", "finding": "Nodule",
     "boxes": [[x, y, w, h], ...] | "mask_png": "<base64 PNG>", "created": "2025-01-31T12:00:00Z",
     "author": "dr-x", "image_path": "images/<sha256>.png"}

A record may instead (or also) carry a clinician's judgement of the served map: ``"judgement": "on"`` (the
map lies on the finding) or ``"off"`` (it misses it), with the ``"method"`` whose map was judged. Such a
record has no region, so DWARF training skips it (:class:`training.dwarf.supervision.FeedbackDataset`);
it is kept for review.

Writes are atomic and never overwrite: the record is written to a hidden temporary file in the same
folder (``.<id>.json.tmp``, which ``*.json`` globs skip), flushed and fsynced, then hard-linked to its
final name (``os.link`` fails if the name exists) and the folder is fsynced. A crash leaves either no
record or a complete one. When the image itself is given, its decoded pixels are stored once per hash
as a header-free 16-bit PNG under ``images/`` (so DICOM header fields never reach the store) and the
record names it in ``image_path``.

Example:
    >>> store = FeedbackStore(tmp_path)                                       # doctest: +SKIP
    >>> rec = store.append(image_sha256="ab" * 32, finding="Nodule", boxes=[[10, 12, 8, 8]])  # doctest: +SKIP
    >>> [r["id"] for r in store.list()] == [rec["id"]]                        # doctest: +SKIP
    True
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import io
import json
import logging
import math
import os
import re
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["FeedbackStore", "FeedbackError", "default_feedback_dir", "validate_boxes", "validate_mask_png", "JUDGEMENTS"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_AUTHOR = 128
JUDGEMENTS = ("on", "off")  # the judged map lies on the finding / misses it


class FeedbackError(ValueError):
    """A feedback record is invalid; the message names the field and the bad value."""


def default_feedback_dir() -> Path:
    """``CXR_FEEDBACK_DIR`` or ``<project>/feedback``."""
    from mlflow_projects.common import PROJECT_ROOT

    env = os.environ.get("CXR_FEEDBACK_DIR")
    return Path(env) if env else PROJECT_ROOT / "feedback"


def validate_boxes(boxes: Any, width: int | None = None, height: int | None = None) -> list[list[float]]:
    """Check ``[[x, y, w, h], ...]`` in pixels of the original image.

    Args:
        boxes: a list of 4-number lists (or a JSON string of one).
        width, height: the image size when known; boxes must then lie inside it.

    Returns:
        The boxes as lists of floats.

    Raises:
        FeedbackError: not a list of 4 finite numbers with ``w, h > 0`` and ``x, y >= 0`` (inside
            the image when its size is known).
    """
    if isinstance(boxes, str):
        try:
            boxes = json.loads(boxes)
        except json.JSONDecodeError:
            raise FeedbackError(f"boxes must be JSON [[x, y, w, h], ...], got {boxes[:80]!r}") from None
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise FeedbackError(f"boxes must be a non-empty list [[x, y, w, h], ...], got {str(boxes)[:80]!r}")
    if all(isinstance(v, (int, float)) for v in boxes) and len(boxes) == 4:
        boxes = [boxes]  # a single box given flat
    out = []
    for box in boxes:
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise FeedbackError(f"box {str(box)[:80]} must be [x, y, w, h] (4 numbers, pixels)")
        x, y, w, h = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0 or x < 0 or y < 0:
            raise FeedbackError(f"box {list(box)} must have finite x, y >= 0 and w, h > 0")
        if width is not None and height is not None and (x + w > width + 1e-6 or y + h > height + 1e-6):
            raise FeedbackError(f"box {list(box)} extends beyond the {width}x{height} image")
        out.append([x, y, w, h])
    return out


def validate_mask_png(data: bytes | str) -> str:
    """Check a mask PNG (raw bytes or base64 text) and return it as base64.

    Raises:
        FeedbackError: not a decodable PNG, or no non-zero pixel.
    """
    from PIL import Image

    if isinstance(data, str):
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise FeedbackError("mask_png must be a base64-encoded PNG") from None
    else:
        raw = bytes(data)
    if not raw.startswith(b"\x89PNG\r\n\x1a\n"):
        raise FeedbackError("mask must be a PNG image (non-zero pixels = finding)")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > 50_000_000:
                raise FeedbackError(f"mask of {img.width}x{img.height} pixels is too large")
            arr = np.asarray(img.convert("L"))
    except FeedbackError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad mask
        raise FeedbackError(f"mask PNG cannot be decoded ({type(exc).__name__})") from None
    if not arr.any():
        raise FeedbackError("mask has no non-zero pixel; mark the finding's region")
    return base64.b64encode(raw).decode("ascii")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_create(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically; never replaces an existing file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails with FileExistsError instead of overwriting
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class FeedbackStore:
    """Append-only folder of feedback records (see the module docstring).

    Args:
        folder: the store (created when missing); default :func:`default_feedback_dir`.
    """

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder else default_feedback_dir()

    def append(self, *, image_sha256: str, finding: str, boxes: Sequence[Sequence[float]] | None = None,
               mask_png: str | None = None, author: str | None = None, image: np.ndarray | None = None,
               model: dict[str, Any] | None = None, judgement: str | None = None,
               method: str | None = None) -> dict[str, Any]:
        """Validate and store one record.

        Args:
            image_sha256: SHA-256 hex of the image bytes as uploaded.
            finding: canonical finding name (validated by the caller against the served classes).
            boxes: ``[[x, y, w, h], ...]`` in original pixels (already validated by :func:`validate_boxes`).
            mask_png: base64 PNG (already validated by :func:`validate_mask_png`).
            author: free text, at most 128 characters.
            image: optional decoded image (H, W) float in [0, 1]; stored once as ``images/<sha>.png``.
            model: optional ``{name, version, alias}`` of the served model (kept for provenance).
            judgement: ``"on"`` / ``"off"``: the served map of ``method`` lies on the finding / misses it.
            method: the attention method whose map was judged (validated by the caller); needed with ``judgement``.

        Returns:
            The record as written.

        Raises:
            FeedbackError: bad hash, finding, author, judgement or method; or no boxes, mask nor judgement.
        """
        sha = str(image_sha256 or "").lower()
        if not _SHA256.match(sha):
            raise FeedbackError(f"image_sha256 must be 64 hex characters, got {str(image_sha256)[:80]!r}")
        if not isinstance(finding, str) or not finding.strip():
            raise FeedbackError("finding must be a non-empty class name")
        if judgement is not None and judgement not in JUDGEMENTS:
            raise FeedbackError(f"judgement must be one of {list(JUDGEMENTS)}, got {str(judgement)[:40]!r}")
        if judgement is not None and (not isinstance(method, str) or not method.strip()):
            raise FeedbackError("a judgement needs the 'method' whose map was judged")
        if not boxes and not mask_png and judgement is None:
            raise FeedbackError("feedback needs 'boxes' ([[x, y, w, h], ...]), a 'mask' PNG or a 'judgement' "
                                f"{list(JUDGEMENTS)} of the map")
        if author is not None and (not isinstance(author, str) or len(author) > MAX_AUTHOR):
            raise FeedbackError(f"author must be a string of at most {MAX_AUTHOR} characters")
        self.folder.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {
            "id": uuid.uuid4().hex, "image_sha256": sha, "finding": finding.strip(),
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        if boxes:
            record["boxes"] = [[float(v) for v in b] for b in boxes]
        if mask_png:
            record["mask_png"] = mask_png
        if author:
            record["author"] = author
        if judgement is not None:
            record["judgement"] = judgement
        if method:
            record["method"] = method.strip()
        if image is not None:
            record["image_path"] = self._store_image(sha, image)
        if model:
            record["model"] = {k: model.get(k) for k in ("name", "version", "alias")}
        _atomic_create(self.folder / f"{record['id']}.json", json.dumps(record, indent=1).encode("utf-8"))
        log.info("feedback %s stored (finding %s, %s)", record["id"], record["finding"],
                 "boxes" if boxes else ("mask" if mask_png else f"map judged {judgement}"))
        return record

    def _store_image(self, sha: str, image: np.ndarray) -> str:
        from PIL import Image

        rel = f"images/{sha}.png"
        path = self.folder / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            arr = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 65535 + 0.5).astype(np.uint16)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            try:
                _atomic_create(path, buf.getvalue())
            except FileExistsError:  # stored concurrently by another request
                pass
        return rel

    def list(self) -> list[dict[str, Any]]:
        """Every record, oldest first (by ``created``, then ``id``)."""
        if not self.folder.is_dir():
            return []
        records = [json.loads(p.read_text()) for p in self.folder.glob("*.json")]
        return sorted(records, key=lambda r: (r.get("created", ""), r.get("id", "")))
