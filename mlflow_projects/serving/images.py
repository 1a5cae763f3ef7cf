"""Images in and out of the service: upload decoding (PNG, JPEG, DICOM with 4xx on bad input),
preprocessing to the model's input, and the PNGs of ``/explain`` (overlay and raw map).

Decoding goes through :func:`training.data.imageio.read_image`, whose messages never contain DICOM
header values, so nothing here can echo PHI.
"""
from __future__ import annotations

import base64
import hashlib
import io
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlflow_projects.serving.errors import ServingError
from mlflow_projects.serving.settings import DEFAULT_MIN_IMAGE_SIDE

__all__ = ["DecodedImage", "decode_upload", "preprocess", "png_bytes", "png_b64", "overlay_png", "display_png", "grey_png", "draw_banner",
           "BANNER_RGB"]

BANNER_RGB = (176, 0, 32)  # the warning band of an overlay (dark red; white text)


@dataclass
class DecodedImage:
    """An uploaded image: pixels (H, W) float32 [0, 1], its size and the SHA-256 of the bytes."""

    pixels: np.ndarray
    width: int
    height: int
    sha256: str
    format: str


def decode_upload(data: bytes | None, max_pixels: int, min_side: int = DEFAULT_MIN_IMAGE_SIDE) -> DecodedImage:
    """Decode an uploaded PNG, JPEG or DICOM file.

    Args:
        data: the file's bytes (None when the field was not sent).
        max_pixels: the pixel limit (``CXR_MAX_PIXELS``), checked from the header before decoding.
        min_side: the shortest side accepted in px (``CXR_MIN_IMAGE_SIDE``), checked from the header: a
            1x1 image upsampled to the model's input is not a radiograph, and no audit covered it.

    Returns:
        The decoded image.

    Raises:
        ServingError: 400 empty / corrupt / truncated / smaller than ``min_side``, 415 unsupported type,
            413 over ``max_pixels``.
    """
    from training.data.imageio import ImageReadError, detect_format, image_size, read_image

    if data is None:
        raise ServingError(400, "empty body: send the image as multipart/form-data field 'image' "
                                "(PNG, JPEG or DICOM)")
    if len(data) == 0:
        raise ServingError(400, "the 'image' file is empty (0 bytes)")
    fmt = detect_format(data[:132])
    if fmt is None:
        raise ServingError(415, "unsupported image type: send PNG, JPEG or DICOM (detected from the content, "
                                "not the file name)", valid=["png", "jpeg", "dicom"])
    try:
        w, h = image_size(data)
    except ImageReadError as exc:
        if "bomb" in exc.reason:
            raise ServingError(413, f"image too large: {exc.reason}") from None
        raise ServingError(400, f"cannot read the image: {exc.reason}") from None
    _check_min_side(w, h, min_side)  # from the header: nothing decoded yet
    if w * h > max_pixels:
        raise ServingError(413, f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} pixels "
                                "(CXR_MAX_PIXELS)")
    try:
        pixels = read_image(data, max_pixels=max_pixels)
    except ImageReadError as exc:
        status = 413 if ("exceeds max_pixels" in exc.reason or "bomb" in exc.reason) else 400
        raise ServingError(status, f"cannot read the image: {exc.reason}") from None
    _check_min_side(int(pixels.shape[1]), int(pixels.shape[0]), min_side)  # the decoded image too
    return DecodedImage(pixels, int(pixels.shape[1]), int(pixels.shape[0]), hashlib.sha256(data).hexdigest(), fmt)


def _check_min_side(w: int, h: int, min_side: int) -> None:
    if min(w, h) < min_side:
        raise ServingError(400, f"image is {w}x{h} px; the model was audited on images of at least {min_side} px "
                                "a side (CXR_MIN_IMAGE_SIDE)")


def preprocess(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize an image to the model input as the training data was (bilinear, antialiased when shrinking).

    Args:
        pixels: (H, W) in [0, 1].
        size: the model's input side S.

    Returns:
        (1, S, S) float32 in [0, 1].
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]  # (1, 1, H, W)
    h, w = pixels.shape
    if (h, w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=(h > size or w > size))
    return x[0].clamp_(0, 1).numpy()


_JET: np.ndarray | None = None


def _jet() -> np.ndarray:
    global _JET
    if _JET is None:
        from matplotlib import colormaps

        _JET = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8).astype(np.float32)  # (256, 3)
    return _JET


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


_BLEND: dict[float, np.ndarray] = {}


def _blend_table(alpha: float) -> np.ndarray:
    """(256 map levels, 256 grey levels, 3) uint8: ``grey (1 - a) + jet(level) a`` with ``a = alpha level / 255``,
    rounded. One gather per overlay pixel instead of float arithmetic per pixel and channel; the
    opacity follows the same 8-bit map level as the colour (at most one grey level from the continuous map)."""
    table = _BLEND.get(alpha)
    if table is None:
        a = np.arange(256, dtype=np.float32)[:, None, None] / 255 * alpha  # (256, 1, 1)
        grey = np.arange(256, dtype=np.float32)[None, :, None]  # (1, 256, 1)
        table = _BLEND[alpha] = (grey * (1 - a) + _jet()[:, None, :] * a + 0.5).astype(np.uint8)
    return table


def png_bytes(arr: np.ndarray) -> bytes:
    """An 8-bit (H, W) grey or (H, W, 3) RGB array as PNG file bytes, encoded for speed.

    Every row uses the PNG "Up" filter (the row minus the row above, computed in one NumPy subtraction) and
    deflate at level 1 (run-length strategy for grey). Pillow's encoder at ``compress_level=1`` tries the
    five filters on every row; this encoder gives files of about the same size in less time (see the ``png_*``
    stages of ``benchmarks/serve_bench.py``). Any PNG
    decoder reads the result (IHDR, one IDAT, IEND; no ancillary chunks, so no metadata travels).

    Args:
        arr: uint8 (H, W) or (H, W, 3), H, W >= 1.

    Returns:
        The PNG file bytes.

    Raises:
        ValueError: another dtype or shape.
    """
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or 0 in arr.shape:
        raise ValueError(f"png_bytes takes a non-empty uint8 (H, W) or (H, W, 3) array, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    grey = arr.ndim == 2
    rows = np.ascontiguousarray(arr).reshape(h, -1)
    raw = np.empty((h, rows.shape[1] + 1), np.uint8)
    raw[:, 0] = 2  # filter type "Up"
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 wraps modulo 256, as the filter defines
    data = _deflate(raw.reshape(-1).data, zlib.Z_RLE if grey else zlib.Z_DEFAULT_STRATEGY)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if grey else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


_PARALLEL_MIN_BYTES = 64 * 1024  # below this, a second thread costs more than it saves
_HELPER: Any = None  # one worker thread for the first half of large PNGs (created on first use)
_HELPER_FREE = threading.Semaphore(1)


def _deflate(data: memoryview, strategy: int) -> bytes:
    """A zlib stream (level 1) of ``data``; a large one in two halves at once when the helper thread is free.

    The halves are raw deflate streams, the first ended by a full flush (byte-aligned, not final) and the second
    by the final block, so their concatenation between a zlib header and the Adler-32 of the whole is one valid
    stream (what pigz does; the second half just does not refer back into the first, so the file is slightly
    larger). zlib releases the GIL while it compresses, so the two halves run on two cores at once. Under
    load, when the helper is busy with another request's PNG, the data is compressed here in one piece.
    """
    global _HELPER
    n = len(data)
    if n < _PARALLEL_MIN_BYTES or not _HELPER_FREE.acquire(blocking=False):
        z = zlib.compressobj(1, zlib.DEFLATED, 15, 8, strategy)
        return z.compress(data) + z.flush()
    try:
        if _HELPER is None:
            from concurrent.futures import ThreadPoolExecutor

            _HELPER = ThreadPoolExecutor(1, thread_name_prefix="png-deflate")
        k = n // 2

        def first() -> bytes:
            z1 = zlib.compressobj(1, zlib.DEFLATED, -15, 8, strategy)
            return z1.compress(data[:k]) + z1.flush(zlib.Z_FULL_FLUSH)

        head = _HELPER.submit(first)
        z2 = zlib.compressobj(1, zlib.DEFLATED, -15, 8, strategy)
        tail = z2.compress(data[k:]) + z2.flush()
        return b"\x78\x01" + head.result() + tail + struct.pack(">I", zlib.adler32(data))
    finally:
        _HELPER_FREE.release()


def png_b64(arr: np.ndarray) -> str:
    """An 8-bit (H, W) or (H, W, 3) array as base64 PNG text (:func:`png_bytes`)."""
    return base64.b64encode(png_bytes(arr)).decode("ascii")


def _display_grey(pixels: np.ndarray, max_side: int):
    """The image as an 8-bit grey PIL image at its size bounded by ``max_side`` (aspect kept)."""
    from PIL import Image

    h, w = pixels.shape
    scale = min(1.0, max_side / max(h, w))
    ow, oh = max(1, round(w * scale)), max(1, round(h * scale))
    grey = Image.fromarray((np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8))
    return grey.resize((ow, oh), Image.BILINEAR) if (ow, oh) != (w, h) else grey


def display_png(pixels: np.ndarray, max_side: int) -> tuple[str, list[int]]:
    """The image alone, grey, at the size of its :func:`overlay_png` (what the review page lays the overlay on).

    Args:
        pixels: the image (H, W) in [0, 1].
        max_side: bound of the longer side (``CXR_OVERLAY_MAX_SIDE``).

    Returns:
        ``(base64 PNG, [width, height])``.
    """
    grey = _display_grey(pixels, max_side)
    return png_b64(np.asarray(grey)), list(grey.size)


def overlay_png(pixels: np.ndarray, heat: np.ndarray, max_side: int, alpha: float = 0.45,
                banner: str | None = None) -> tuple[str, list[int]]:
    """Colour the normalised map over the image, at the image size bounded by ``max_side``.

    Args:
        pixels: the image (H, W) in [0, 1].
        heat: the map (S, S) in [0, 1].
        max_side: bound of the longer side (``CXR_OVERLAY_MAX_SIDE``); the aspect ratio is kept.
        alpha: colour opacity where the map is 1 (scaled by the map: stronger where attention is high).
        banner: a warning drawn across the top (:func:`draw_banner`), e.g. ``"UNFIT: <reason>"``; None: none.

    Returns:
        ``(base64 PNG, [width, height])``.
    """
    from PIL import Image

    grey = _display_grey(pixels, max_side)
    ow, oh = grey.size
    hm = Image.fromarray(np.clip(heat, 0, 1).astype(np.float32)).resize((ow, oh), Image.BILINEAR)
    idx = (np.clip(np.asarray(hm), 0, 1) * 255 + 0.5).astype(np.uint8)  # (oh, ow) map level, 0..255
    out = _blend_table(float(alpha))[idx, np.asarray(grey)]  # (oh, ow, 3) uint8
    if banner:
        out = draw_banner(out, banner)
    return png_b64(out), [ow, oh]


def draw_banner(rgb: np.ndarray, text: str, max_lines: int = 3) -> np.ndarray:
    """A copy of ``rgb`` with ``text`` in white on an opaque :data:`BANNER_RGB` band across the top.

    The text is wrapped to the image width (at most ``max_lines`` lines, the last one cut with "...");
    the font size follows the width (9 to 28 px), so the band stays readable on a 72 px thumbnail and on
    a 1024 px overlay. The band always spans the full width, so it is visible even where no character fits.

    Args:
        rgb: (H, W, 3) uint8.
        text: the warning.
        max_lines: most lines of text.

    Returns:
        (H, W, 3) uint8.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    w, h = img.size
    font = ImageFont.load_default(size=int(np.clip(w / 40, 9, 28)))
    pad = max(1, round(font.size / 4))
    lines, line = [], ""
    for word in str(text).split():
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= w - 2 * pad or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip() + " ..."
    line_h = font.size + pad
    band = min(h, len(lines) * line_h + 2 * pad)
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, w - 1, band - 1], fill=BANNER_RGB)
    for i, ln in enumerate(lines):
        draw.text((pad, pad + i * line_h), ln, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def grey_png(raw: np.ndarray) -> tuple[str, list[int], list[float]]:
    """A raw map as an 8-bit grey PNG linearly spanning its value range.

    Args:
        raw: (h, w) map in any range.

    Returns:
        ``(base64 PNG, [width, height], [min, max])``: pixel ``p`` means ``min + p / 255 * (max - min)``.
    """
    raw = np.asarray(raw, dtype=np.float32)
    lo, hi = float(raw.min()), float(raw.max())
    span = hi - lo
    q = np.zeros(raw.shape, np.uint8) if span <= 0 else ((raw - lo) / span * 255 + 0.5).astype(np.uint8)
    return png_b64(q), [int(raw.shape[1]), int(raw.shape[0])], [lo, hi]
