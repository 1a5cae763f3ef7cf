"""Image I/O: PNG/JPEG (8- and 16-bit) and DICOM to one float32 grey array in [0, 1].

The file type is found from its first bytes, never from its name: PNG (``\\x89PNG``), JPEG
(``\\xff\\xd8\\xff``), DICOM (``DICM`` at byte 128, or a bare data set without the preamble). Every
problem (missing, empty, truncated, corrupt, unsupported, too large) raises one error type,
:class:`ImageReadError`, whose message names the file; no library traceback escapes.

Sizes are checked from the header *before* pixels are decoded, so a decompression bomb (a small
file that claims a huge image) is refused without allocating it; Pillow's own
``DecompressionBombWarning`` is turned into the same error.

DICOM pixels go through the standard chain: stored values (``BitsStored``) -> Modality LUT
(``RescaleSlope`` / ``RescaleIntercept`` or a Modality LUT Sequence) -> VOI LUT (a VOI LUT Sequence,
else the first ``WindowCenter`` / ``WindowWidth`` with its ``VOILUTFunction``) -> [0, 1], and
``MONOCHROME1`` is inverted last so that bright always means dense. Without a VOI transform the
range the stored bits can hold (not the image's own min/max) maps to [0, 1]. Header values are never
logged or put in messages (they may identify a patient).

Example:
    >>> import numpy as np, io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.fromarray(np.full((4, 6), 255, np.uint8)).save(buf, "PNG")
    >>> img = read_image(buf.getvalue())
    >>> img.shape, img.dtype, float(img.max())
    ((4, 6), dtype('float32'), 1.0)
"""
from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from pathlib import Path
from typing import Union

import numpy as np

__all__ = ["ImageReadError", "read_image", "image_size", "detect_format", "SUPPORTED_FORMATS",
           "DEFAULT_MAX_PIXELS"]

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

SUPPORTED_FORMATS = ("png", "jpeg", "dicom")
DEFAULT_MAX_PIXELS = 50_000_000

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
# explicit-VR value representations that can follow the first tag of a bare DICOM data set
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB",
        b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM",
        b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"}


class ImageReadError(ValueError):
    """An image could not be read; the message names the file and says why.

    Attributes:
        path: the file (``"<bytes>"`` for in-memory data).
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


def _name(src: ImageSource) -> str:
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def _read_bytes(src: ImageSource, name: str, limit: int | None = None) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return data if limit is None else data[:limit]
    if not isinstance(src, (str, os.PathLike)):
        raise ImageReadError(name, f"expected a path or bytes, got {type(src).__name__}")
    p = Path(src)
    try:
        with open(p, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except FileNotFoundError:
        raise ImageReadError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(name, "is a directory, not an image file") from None
    except OSError as e:
        raise ImageReadError(name, f"cannot open ({e.strerror or type(e).__name__})") from None


def detect_format(head: bytes) -> str | None:
    """The format of an image from its first bytes (at least 132 for DICOM with preamble).

    Args:
        head: the file's first bytes.

    Returns:
        ``"png"``, ``"jpeg"``, ``"dicom"`` or ``None`` when none matches.
    """
    if head.startswith(_PNG):
        return "png"
    if head.startswith(_JPEG):
        return "jpeg"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"DICM"):
        return "dicom"
    # a bare data set: group 0x0002 or 0x0008 first, little endian, with an explicit VR or a
    # plausible implicit-VR length
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00":
        if head[4:6] in _VRS:
            return "dicom"
        length = int.from_bytes(head[4:8], "little")
        if length < 1024:
            return "dicom"
    return None


def _check_pixels(name: str, width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    if width < 1 or height < 1:
        raise ImageReadError(name, f"header gives an empty image ({width}x{height})")
    if width * height * max(frames, 1) > max_pixels:
        raise ImageReadError(name, f"image of {width}x{height} pixels{' x %d frames' % frames if frames > 1 else ''}"
                                   f" exceeds max_pixels={max_pixels} (possible decompression bomb)")


# ----------------------------------------------------------------------------------------------
# PNG / JPEG

def _open_pil(data: bytes, name: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(name, f"decompression bomb refused by Pillow ({e})") from None
    except UnidentifiedImageError:
        raise ImageReadError(name, "corrupt header (Pillow cannot identify the image)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(name, f"corrupt header ({e})") from None
    w, h = img.size
    _check_pixels(name, w, h, max_pixels)
    return img


def _decode_pil(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    from PIL import Image, ImageOps

    img = _open_pil(data, name, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            if img.format == "JPEG":
                img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(img, dtype=np.uint16).astype(np.float32) / 65535.0
            elif mode == "I":
                a = np.asarray(img, dtype=np.int64)
                top = 65535.0 if a.max(initial=0) <= 65535 and a.min(initial=0) >= 0 else float(a.max() - a.min()) or 1.0
                arr = ((a - min(0, a.min(initial=0))) / top).astype(np.float32)
            elif mode == "F":
                a = np.asarray(img, dtype=np.float32)
                lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
                arr = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
            elif mode == "L":
                arr = np.asarray(img, dtype=np.float32) / 255.0
            else:   # RGB, RGBA, P, LA, CMYK, 1, YCbCr ...: ITU-R 601 luma
                arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(name, f"decompression bomb refused by Pillow ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise ImageReadError(name, f"corrupt or truncated {img.format or 'image'} data ({e})") from None
    return arr


# ----------------------------------------------------------------------------------------------
# DICOM

def _dicom_dataset(data: bytes, name: str, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if data.startswith(b"DICM"):   # prefix without the 128-byte preamble
        data = b"\0" * 128 + data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # pydicom warns about odd headers; we raise instead
            return pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise ImageReadError(name, f"corrupt DICOM header ({type(e).__name__})") from None


def _dicom_geometry(ds, name: str) -> tuple[int, int, int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(name, "DICOM without Rows/Columns (not an image)") from None
    return cols, rows, frames


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    if width == 1.0:
        return (x >= center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(v) -> float:
    try:
        return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else float(v)
    except (TypeError, ValueError, IndexError):
        return float("nan")


def _decode_dicom(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = _dicom_dataset(data, name)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(name, "DICOM without pixel data (not an image, or truncated)")
    w, h, frames = _dicom_geometry(ds, name)
    _check_pixels(name, w, h, max_pixels, frames)
    try:
        arr = ds.pixel_array
        if frames > 1:   # (F, H, W[, 3])
            logger.warning("%s: multi-frame DICOM, using the first frame", name)
            arr = arr[0]
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise anything; we name the file instead
        raise ImageReadError(name, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim == 3:   # colour (H, W, 3): luma
            top = float(2 ** int(getattr(ds, "BitsStored", 8)) - 1)
            rgb = arr.astype(np.float64) / top
            return np.clip(rgb[..., :3] @ np.array([0.299, 0.587, 0.114]), 0, 1).astype(np.float32)

        bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
        signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
        lo_s, hi_s = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        x = apply_modality_lut(arr, ds).astype(np.float64)
        if "ModalityLUTSequence" in ds:
            lo, hi = float(x.min()), float(x.max())
        else:
            slope = float(getattr(ds, "RescaleSlope", 1) or 1)
            icpt = float(getattr(ds, "RescaleIntercept", 0) or 0)
            lo, hi = sorted((lo_s * slope + icpt, hi_s * slope + icpt))

        if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
            # the LUT is indexed by (integer) modality-LUT output values
            y = apply_voi_lut(np.rint(x).astype(np.int64), ds, index=0, prefer_lut=True)
            lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            top = max(float(2 ** lut_bits - 1), float(np.max(y)))
            out = np.asarray(y, dtype=np.float64) / top
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            c, wd = _first(ds.WindowCenter), _first(ds.WindowWidth)
            fn = str(getattr(ds, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
            if np.isfinite(c) and np.isfinite(wd) and wd > 0:
                out = _window(x, c, wd, fn)
            else:
                out = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        else:
            out = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        out = np.clip(out, 0.0, 1.0)
        if photometric == "MONOCHROME1":
            out = 1.0 - out
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(name, f"cannot apply the DICOM pixel transforms ({type(e).__name__})") from None
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# public API

def read_image(src: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG, JPEG or DICOM image as grey float32 in [0, 1].

    Args:
        src: a file path, or the file's bytes. The type is detected from the content.
        max_pixels: refuse images with more pixels (width x height x frames) than this, checked from
            the header before decoding. For PNG/JPEG Pillow's own guard (``Image.MAX_IMAGE_PIXELS``,
            about 89 Mpx, whose warning is turned into this error) applies too, so raising
            ``max_pixels`` above it has no effect for those formats.

    Returns:
        Array (H, W) float32 in [0, 1]; 8-bit data divided by 255, 16-bit by 65535, colour converted
        to luma, DICOM as described in the module docstring (MONOCHROME1 inverted).

    Raises:
        ImageReadError: the file is missing, empty, truncated, corrupt, of an unsupported type, or
            larger than ``max_pixels``; the message names the file.

    Example:
        >>> read_image("chest.dcm").shape  # doctest: +SKIP
        (1024, 1024)
    """
    name = _name(src)
    if not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    data = _read_bytes(src, name)
    if not data:
        raise ImageReadError(name, "empty file")
    fmt = detect_format(data[:132])
    if fmt is None:
        raise ImageReadError(name, f"unsupported or unrecognised file type; supported: {list(SUPPORTED_FORMATS)}")
    arr = _decode_dicom(data, name, max_pixels) if fmt == "dicom" else _decode_pil(data, name, max_pixels)
    if arr.ndim != 2 or arr.size == 0:
        raise ImageReadError(name, f"decoded to an array of shape {arr.shape}, expected (H, W)")
    return np.ascontiguousarray(np.clip(arr, 0.0, 1.0), dtype=np.float32)


def image_size(src: ImageSource, *, max_pixels: int | None = None) -> tuple[int, int]:
    """The ``(width, height)`` of an image from its header only (no pixel decoding).

    Args:
        src: a file path or the file's bytes.
        max_pixels: optionally refuse images larger than this, as :func:`read_image` would.

    Returns:
        ``(width, height)`` in pixels.

    Raises:
        ImageReadError: missing, empty, unsupported or corrupt header.
    """
    name = _name(src)
    head = _read_bytes(src, name, limit=132)
    if not head:
        raise ImageReadError(name, "empty file")
    fmt = detect_format(head)
    if fmt is None:
        raise ImageReadError(name, f"unsupported or unrecognised file type; supported: {list(SUPPORTED_FORMATS)}")
    limit = max_pixels if max_pixels is not None else 2 ** 62
    if fmt == "dicom":
        data = _read_bytes(src, name)
        ds = _dicom_dataset(data, name, stop_before_pixels=True)
        w, h, frames = _dicom_geometry(ds, name)
        _check_pixels(name, w, h, limit, frames)
        return w, h
    if isinstance(src, (bytes, bytearray, memoryview)):
        img = _open_pil(bytes(src), name, limit)
        return img.size
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(src) as img:
                w, h = img.size
    except Image.DecompressionBombError:
        raise ImageReadError(name, "decompression bomb refused by Pillow") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageReadError(name, f"corrupt header ({type(e).__name__})") from None
    _check_pixels(name, w, h, limit)
    return w, h
