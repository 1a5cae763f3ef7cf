"""Image I/O on the real PNG/DICOM fixtures and on hand-made files whose pixels are known."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.imageio import ImageReadError, detect_format, image_size, read_image

SIIM = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"


def _png(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, **kw).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _dicom(tmp_path: Path, pixels: np.ndarray, name: str = "x.dcm", preamble: bool = True, **attrs) -> Path:
    """An uncompressed grey DICOM file with the given stored pixels and header attributes."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"   # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / name), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    if not preamble:
        path.write_bytes(path.read_bytes()[132:])
    return path


# ------------------------------------------------------------------------------------------ real files

@pytest.mark.parametrize("name", ["00000001_000.png", "00027426_000.png"])
def test_real_nih_png(real_fixtures, name):
    path = real_fixtures / "images" / name
    img = read_image(path)
    ref = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    assert img.shape == (512, 512) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    np.testing.assert_array_equal(img, ref)
    assert image_size(path) == (512, 512)
    np.testing.assert_array_equal(read_image(path.read_bytes()), img)   # bytes give the same pixels


def test_real_chestx_det_png(real_fixtures):
    path = real_fixtures / "images" / "chestx_det_demo.png"
    assert image_size(path) == (2021, 2021)
    assert read_image(path).shape == (2021, 2021)
    with pytest.raises(ImageReadError, match="chestx_det_demo.png.*max_pixels=1000000"):
        read_image(path, max_pixels=1_000_000)


def test_real_dicom_pair_same_orientation(real_fixtures):
    normal = read_image(real_fixtures / "dicom" / SIIM)
    mono1 = read_image(real_fixtures / "dicom" / "Fake_MONOHR1.dcm")
    assert normal.shape == mono1.shape == (1024, 1024)
    assert image_size(real_fixtures / "dicom" / SIIM) == (1024, 1024)
    # same stored pixels, MONOCHROME1 must come out inverted: 1 - mono1 is the normal image
    corr = np.corrcoef(normal.ravel(), (1.0 - mono1).ravel())[0, 1]
    assert corr > 0.9999
    np.testing.assert_allclose(normal, 1.0 - mono1, atol=1e-6)
    # orientation: a flipped or transposed copy does not match
    assert np.corrcoef(normal.ravel(), normal[::-1].ravel())[0, 1] < 0.9
    assert np.corrcoef(normal.ravel(), normal.T.ravel())[0, 1] < 0.9
    # 8-bit stored values scale by 2^8 - 1: the image spans the range
    assert normal.min() == 0.0 and normal.max() > 0.99


def test_dicom_detected_without_preamble_or_extension(real_fixtures, tmp_path):
    data = (real_fixtures / "dicom" / SIIM).read_bytes()
    ref = read_image(data)
    for k, blob in enumerate([data[128:], data[132:]]):     # "DICM" prefix only; bare data set
        assert detect_format(blob[:132]) == "dicom"
        p = tmp_path / f"img{k}.png"                         # misleading extension
        p.write_bytes(blob)
        np.testing.assert_array_equal(read_image(p), ref)
        assert image_size(p) == (1024, 1024)


# ------------------------------------------------------------------------------------------ PNG / JPEG

def test_16bit_png(tmp_path):
    arr = (np.arange(48 * 32, dtype=np.uint32).reshape(32, 48) * 41 % 65536).astype(np.uint16)
    arr[0, 0], arr[0, 1] = 0, 65535
    p = tmp_path / "a.png"
    p.write_bytes(_png(arr))
    assert Image.open(p).mode.startswith("I;16")
    img = read_image(p)
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-7)
    assert img[0, 1] == 1.0 and image_size(p) == (48, 32)


def test_rgb_and_palette_to_grey(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = 200
    img = read_image(_png(rgb))
    assert img.shape == (8, 10)
    np.testing.assert_allclose(img, round(200 * 299 / 1000) / 255.0, atol=1 / 255)   # ITU-R 601 luma
    rgba = np.dstack([rgb, np.full((8, 10), 255, np.uint8)])
    np.testing.assert_array_equal(read_image(_png(rgba)), img)


def test_jpeg(tmp_path):
    grad = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1))
    buf = io.BytesIO()
    Image.fromarray(grad).save(buf, format="JPEG", quality=95)
    p = tmp_path / "x.dcm"   # content decides, not the name
    p.write_bytes(buf.getvalue())
    img = read_image(p)
    assert img.shape == (32, 64)
    np.testing.assert_allclose(img, grad / 255.0, atol=0.03)


# ------------------------------------------------------------------------------------------ DICOM chain

def test_dicom_bits_stored_rescale_and_monochrome1(tmp_path):
    stored = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)    # 12 bits in 16
    p = _dicom(tmp_path, stored, BitsStored=12, HighBit=11)
    np.testing.assert_allclose(read_image(p), stored / 4095.0, atol=1e-6)
    m1 = _dicom(tmp_path, stored, name="m1.dcm", BitsStored=12, HighBit=11, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_allclose(read_image(m1), 1.0 - stored / 4095.0, atol=1e-6)
    # a rescale maps the full stored range linearly, so [0, 1] is unchanged; a negative slope flips it
    rs = _dicom(tmp_path, stored, name="rs.dcm", BitsStored=12, HighBit=11, RescaleSlope=2, RescaleIntercept=-1000)
    np.testing.assert_allclose(read_image(rs), stored / 4095.0, atol=1e-6)
    neg = _dicom(tmp_path, stored, name="neg.dcm", BitsStored=12, HighBit=11, RescaleSlope=-1, RescaleIntercept=0)
    np.testing.assert_allclose(read_image(neg), 1.0 - stored / 4095.0, atol=1e-6)


def test_dicom_window(tmp_path):
    stored = np.array([[0, 100, 150], [200, 300, 4000]], dtype=np.uint16)
    # rescaled values: 2 * v - 100 -> [-100, 100, 200, 300, 500, 7900]; window 200 +- 100 (width 201)
    p = _dicom(tmp_path, stored, BitsStored=12, HighBit=11, RescaleSlope=2, RescaleIntercept=-100,
               WindowCenter=200.5, WindowWidth=201)
    want = np.clip((2.0 * stored - 100 - 200) / 200 + 0.5, 0, 1)   # PS3.3 C.11.2.1.2 linear
    np.testing.assert_allclose(read_image(p), want, atol=1e-6)
    m1 = _dicom(tmp_path, stored, name="m1.dcm", BitsStored=12, HighBit=11, RescaleSlope=2,
                RescaleIntercept=-100, WindowCenter=200.5, WindowWidth=201, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_allclose(read_image(m1), 1 - want, atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    stored = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]            # 4 entries, first input 0, 8-bit output
    item.LUTData = np.array([0, 255, 51, 102], np.uint16).tobytes()   # not monotonic: only a real LUT gives this
    p = _dicom(tmp_path, stored, BitsStored=2, HighBit=1, VOILUTSequence=Sequence([item]))
    np.testing.assert_allclose(read_image(p), np.array([[0, 255], [51, 102]]) / 255.0, atol=1e-6)


def test_dicom_signed(tmp_path):
    stored = np.array([[-2048, 0], [1024, 2047]], dtype=np.int16)
    p = _dicom(tmp_path, stored, BitsStored=12, HighBit=11)
    np.testing.assert_allclose(read_image(p), (stored + 2048) / 4095.0, atol=1e-6)


def test_dicom_bomb_checked_before_decoding(tmp_path):
    p = _dicom(tmp_path, np.zeros((4, 4), np.uint16))
    with pytest.raises(ImageReadError, match="x.dcm.*max_pixels=10"):
        read_image(p, max_pixels=10)


def test_dicom_without_pixels(tmp_path):
    p = _dicom(tmp_path, np.zeros((4, 4), np.uint16))
    import pydicom

    ds = pydicom.dcmread(p)
    del ds.PixelData
    ds.save_as(p)
    with pytest.raises(ImageReadError, match="x.dcm.*without pixel data"):
        read_image(p)


# ------------------------------------------------------------------------------------------ bad files

def _bad_files(real_fixtures) -> dict[str, bytes]:
    png = (real_fixtures / "images" / "00000001_000.png").read_bytes()
    dcm = (real_fixtures / "dicom" / SIIM).read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="JPEG")
    return {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "corrupt.png": png[:120] + bytes(4000),
        "header_only.png": png[:40],
        "truncated.jpg": buf.getvalue()[:300],
        "truncated.dcm": dcm[:3000],
        "text.png": b"this is not an image at all" * 10,
        "bomb.png": _png_header_only(100_000, 100_000),
    }


@pytest.mark.parametrize("name", ["empty.png", "truncated.png", "corrupt.png", "header_only.png", "truncated.jpg",
                                  "truncated.dcm", "text.png", "bomb.png"])
def test_bad_files_raise_one_error_naming_the_file(real_fixtures, tmp_path, name):
    p = tmp_path / name
    p.write_bytes(_bad_files(real_fixtures)[name])
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    assert str(p) in str(e.value) and e.value.path == str(p)
    assert isinstance(e.value, ValueError)


def test_bomb_reasons(tmp_path):
    small_bomb = _png_header_only(8000, 8000)      # 64 Mpx: over our default, under Pillow's limits
    with pytest.raises(ImageReadError, match="exceeds max_pixels=50000000"):
        read_image(small_bomb)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(_png_header_only(100_000, 100_000), max_pixels=10**12)   # Pillow's own guard
    assert image_size(small_bomb) == (8000, 8000)                          # header only, no decoding
    with pytest.raises(ImageReadError, match="max_pixels"):
        image_size(small_bomb, max_pixels=1000)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(ImageReadError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="BMP")
    with pytest.raises(ImageReadError, match="supported: \\['png', 'jpeg', 'dicom'\\]"):
        read_image(buf.getvalue())
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(_png(np.zeros((2, 2), np.uint8)), max_pixels=0)
