"""models.display_image: every transfer syntax a PACS sends decodes to the same display image.

Compressed variants are made from one small synthetic DX image with pydicom's own encoders
(RLE, JPEG-LS, JPEG 2000) and with dcmtk's ``dcmcjpeg``/``dcmconv`` (JPEG baseline, extended and
lossless, big endian, deflated), so each comparison is against an independently encoded file.
Real files from pydicom-data cover a Fuji CR pair (uncompressed vs. lossless JPEG 2000) and JPEG-LL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MPEG2MPML,
    RLELossless,
)

from models.display_image import DecodeError, read_display_image
from tests.dicom_factory import make_dx

data_store = pytest.importorskip("data_store", reason="pydicom-data is needed for the real CR files")
DATA_DIR = Path(data_store.__file__).parent / "data"


# ---------------------------------------------------------------------------- helpers
def _phantom(rows: int = 48, cols: int = 64, bits: int = 12, seed: int = 3) -> np.ndarray:
    """Soft tissue ramp with a bright 'bone' ellipse and noise: edges and flat areas for the codecs."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    y, x = np.mgrid[0:rows, 0:cols]
    image = 0.15 + 0.35 * x / cols
    bone = ((y - rows / 2) / (rows / 3)) ** 2 + ((x - cols / 2) / (cols / 6)) ** 2 < 1.0
    image = np.where(bone, 0.85, image) + rng.normal(0.0, 0.02, size=(rows, cols))
    return np.clip(image * top, 0, top).astype(np.uint8 if bits <= 8 else np.uint16)


def _synthetic(tmp_path: Path, name: str = "dx.dcm", bits: int = 12, frames: int = 1) -> Dataset:
    """A DX dataset (written and re-read, so it looks like a received file) with the phantom pixels."""
    ds = make_dx(tmp_path / "template.dcm", size=8)
    pixels = _phantom(bits=bits)
    if frames > 1:
        # Later frames are visibly different, so returning the wrong frame fails the test.
        pixels = np.stack([pixels] + [((1 << bits) - 1 - pixels) for _ in range(frames - 1)])
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.WindowCenter = (1 << bits) // 2
    ds.WindowWidth = 1 << bits
    ds.PixelData = pixels.tobytes()
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _dcmtk(tmp_path: Path, tool: str, *args: str, source: Dataset) -> Dataset:
    """Run a dcmtk converter on ``source`` and read its output back."""
    if shutil.which(tool) is None:
        pytest.skip(f"dcmtk {tool} not installed")
    src = tmp_path / f"in-{tool}-{'-'.join(a.strip('+-') for a in args)}.dcm"
    dst = src.with_name(src.name.replace("in-", "out-"))
    source.save_as(src, enforce_file_format=True)
    subprocess.run([tool, *args, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return pydicom.dcmread(dst)


def _compressed(source: Dataset, tsyntax: pydicom.uid.UID, **kwargs: object) -> Dataset:
    encoder = get_encoder(tsyntax)
    if not encoder.is_available:
        pytest.skip(f"no encoder for {tsyntax.name}: {encoder.missing_dependencies}")
    ds = pydicom.dcmread(source.filename)
    ds.compress(tsyntax, **kwargs)
    return ds


@pytest.fixture
def dx12(tmp_path: Path) -> Dataset:
    return _synthetic(tmp_path, "dx12.dcm", bits=12)


@pytest.fixture
def dx8(tmp_path: Path) -> Dataset:
    return _synthetic(tmp_path, "dx8.dcm", bits=8)


# ------------------------------------------------------------------- basic contract
def test_output_is_float32_unit_range_and_windowed(dx12: Dataset) -> None:
    image = read_display_image(dx12)
    assert image.dtype == np.float32
    assert image.shape == (48, 64)
    assert 0.0 <= image.min() and image.max() <= 1.0
    # Full-range window (center 2048, width 4096): display value ~ stored / 4095.
    expected = _phantom(bits=12).astype(np.float64) / 4095.0
    np.testing.assert_allclose(image, expected, atol=2e-3)


def test_narrow_window_clips_and_stretches(dx12: Dataset) -> None:
    dx12.WindowCenter, dx12.WindowWidth = 2000, 400
    image = read_display_image(dx12)
    raw = _phantom(bits=12)
    assert np.all(image[raw <= 1800] == 0.0)
    assert np.all(image[raw > 2200] == 1.0)
    middle = (raw > 1850) & (raw < 2150)
    assert middle.any()
    np.testing.assert_allclose(image[middle], (raw[middle] - 1799.5) / 399.0, atol=5e-3)


def test_rescale_is_applied_before_window(dx12: Dataset) -> None:
    # Window given in rescaled units; stored value v shows like v*2-1000 under that window.
    dx12.RescaleSlope, dx12.RescaleIntercept = 2, -1000
    dx12.WindowCenter, dx12.WindowWidth = 2 * 2000 - 1000, 800
    rescaled = read_display_image(dx12)
    del dx12.RescaleSlope, dx12.RescaleIntercept
    dx12.WindowCenter, dx12.WindowWidth = 2000, 400
    plain = read_display_image(dx12)
    np.testing.assert_allclose(rescaled, plain, atol=3e-3)


def test_voi_lut_sequence_is_used(dx12: Dataset) -> None:
    # A decreasing LUT turns the image negative: proves the LUT, not the window, was applied.
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = list(range(4095, -1, -1))
    dx12.VOILUTSequence = [item]
    image = read_display_image(dx12)
    expected = 1.0 - _phantom(bits=12).astype(np.float64) / 4095.0
    np.testing.assert_allclose(image, expected, atol=1e-6)


def test_no_window_uses_robust_percentiles(dx12: Dataset) -> None:
    del dx12.WindowCenter, dx12.WindowWidth
    pixels = _phantom(bits=12)
    pixels[0, 0] = 4095  # one hot pixel must not squash the contrast of the rest
    pixels[0, 1] = 0
    dx12.PixelData = pixels.tobytes()
    image = read_display_image(dx12)
    low, high = np.percentile(pixels.astype(np.float64), [0.5, 99.5])
    expected = np.clip((pixels - low) / (high - low), 0, 1)
    np.testing.assert_allclose(image, expected, atol=1e-5)
    assert np.ptp(image[1:, :]) > 0.9


def test_unusable_window_falls_back_to_percentiles(dx12: Dataset) -> None:
    dx12.WindowCenter, dx12.WindowWidth = 2000, 0  # LINEAR needs width >= 1
    image = read_display_image(dx12)
    assert np.ptp(image) == pytest.approx(1.0)


def test_monochrome1_is_inverted(dx12: Dataset) -> None:
    mono2 = read_display_image(dx12)
    dx12.PhotometricInterpretation = "MONOCHROME1"
    dx12.PresentationLUTShape = "INVERSE"
    mono1 = read_display_image(dx12)
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    # Bone (bright in the phantom's MONOCHROME2 sense) is dark once stored as MONOCHROME1.
    bone = _phantom(bits=12) > 3000
    assert mono1[bone].mean() < 0.3 < 0.7 < mono2[bone].mean()


def test_rgb_becomes_luminance(tmp_path: Path) -> None:
    ds = make_dx(tmp_path / "rgb.dcm", size=4)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, :, 0] = 255  # red
    rgb[1, :, 1] = 255  # green
    rgb[2, :, 2] = 255  # blue
    rgb[3, :, :] = 255  # white
    ds.PhotometricInterpretation = "RGB"
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    for keyword in ("WindowCenter", "WindowWidth", "PresentationLUTShape"):
        del ds[keyword]
    ds.PixelData = rgb.tobytes()
    image = read_display_image(ds)
    np.testing.assert_allclose(image[:, 0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)


def test_ybr_jpeg_colour_file_decodes() -> None:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    reference = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb.dcm"))
    assert ds.PhotometricInterpretation.startswith("YBR")
    np.testing.assert_allclose(read_display_image(ds), read_display_image(reference), atol=0.03)


# ------------------------------------------------------------------ real CR files
def test_rg3_lossless_j2k_matches_uncompressed() -> None:
    uncompressed = pydicom.dcmread(DATA_DIR / "RG3_UNCR.dcm")
    j2k = pydicom.dcmread(DATA_DIR / "RG3_J2KR.dcm")
    assert j2k.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert uncompressed.PhotometricInterpretation == "MONOCHROME1"
    a, b = read_display_image(uncompressed), read_display_image(j2k)
    assert a.shape == (1760, 1760)
    np.testing.assert_array_equal(a, b)
    assert np.ptp(a) > 0.5


def test_jpeg_lossless_file_matches_dcmtk_decoder(tmp_path: Path) -> None:
    original = pydicom.dcmread(DATA_DIR / "JPEG-LL.dcm")
    assert original.file_meta.TransferSyntaxUID.is_compressed
    # dcmtk's IJG-based decoder is independent of pylibjpeg: both must give the same pixels.
    reference = _dcmtk(tmp_path, "dcmdjpeg", source=original)
    assert not reference.file_meta.TransferSyntaxUID.is_compressed
    image = read_display_image(original)
    assert image.shape == (original.Rows, original.Columns)
    np.testing.assert_array_equal(image, read_display_image(reference))


# ------------------------------------------------------------ synthetic round trips
@pytest.mark.parametrize(
    ("tsyntax", "kwargs"),
    [
        (RLELossless, {}),
        (JPEGLSLossless, {}),
        (JPEG2000Lossless, {}),
    ],
    ids=["rle", "jpeg-ls-lossless", "j2k-lossless"],
)
def test_pydicom_lossless_encodings_decode_exactly(dx12: Dataset, tsyntax: pydicom.uid.UID, kwargs: dict) -> None:
    compressed = _compressed(dx12, tsyntax, **kwargs)
    assert compressed.file_meta.TransferSyntaxUID == tsyntax
    np.testing.assert_array_equal(read_display_image(compressed), read_display_image(dx12))


@pytest.mark.parametrize(
    ("tsyntax", "kwargs"),
    [
        (JPEGLSNearLossless, {"jls_error": 3}),
        (JPEG2000, {"j2k_cr": [3]}),
    ],
    ids=["jpeg-ls-near-lossless", "j2k-lossy"],
)
def test_pydicom_lossy_encodings_decode_closely(dx12: Dataset, tsyntax: pydicom.uid.UID, kwargs: dict) -> None:
    compressed = _compressed(dx12, tsyntax, **kwargs)
    assert compressed.file_meta.TransferSyntaxUID == tsyntax
    diff = np.abs(read_display_image(compressed) - read_display_image(dx12))
    assert diff.mean() < 0.01 and diff.max() < 0.1


@pytest.mark.parametrize("flag", ["+e1", "+el"], ids=["jpeg-lossless-sv1", "jpeg-lossless-p14"])
def test_dcmtk_jpeg_lossless_decodes_exactly(tmp_path: Path, dx12: Dataset, flag: str) -> None:
    compressed = _dcmtk(tmp_path, "dcmcjpeg", flag, source=dx12)
    assert compressed.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(read_display_image(compressed), read_display_image(dx12))


def test_dcmtk_jpeg_baseline_8bit_decodes_closely(tmp_path: Path, dx8: Dataset) -> None:
    compressed = _dcmtk(tmp_path, "dcmcjpeg", "+eb", "+q", "95", source=dx8)
    assert compressed.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    diff = np.abs(read_display_image(compressed) - read_display_image(dx8))
    assert diff.mean() < 0.01 and diff.max() < 0.1


def test_dcmtk_jpeg_extended_12bit_decodes_closely(tmp_path: Path, dx12: Dataset) -> None:
    compressed = _dcmtk(tmp_path, "dcmcjpeg", "+ee", "+q", "95", source=dx12)
    assert compressed.file_meta.TransferSyntaxUID == pydicom.uid.JPEGExtended12Bit
    diff = np.abs(read_display_image(compressed) - read_display_image(dx12))
    assert diff.mean() < 0.01 and diff.max() < 0.1


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("+tb", pydicom.uid.ExplicitVRBigEndian), ("+td", pydicom.uid.DeflatedExplicitVRLittleEndian),
     ("+ti", pydicom.uid.ImplicitVRLittleEndian)],
    ids=["big-endian", "deflated", "implicit"],
)
def test_dcmtk_uncompressed_variants_decode_exactly(tmp_path: Path, dx12: Dataset, flag: str, expected: str) -> None:
    converted = _dcmtk(tmp_path, "dcmconv", flag, source=dx12)
    assert converted.file_meta.TransferSyntaxUID == expected
    np.testing.assert_array_equal(read_display_image(converted), read_display_image(dx12))


@pytest.mark.parametrize("tsyntax", [None, RLELossless], ids=["native", "rle"])
def test_multiframe_returns_first_frame(tmp_path: Path, tsyntax: pydicom.uid.UID | None) -> None:
    single = _synthetic(tmp_path, "one.dcm", frames=1)
    multi = _synthetic(tmp_path, "three.dcm", frames=3)
    if tsyntax is not None:
        multi = _compressed(multi, tsyntax)
    np.testing.assert_array_equal(read_display_image(multi), read_display_image(single))


def test_dataset_without_file_meta_is_read_as_native(dx12: Dataset) -> None:
    expected = read_display_image(dx12)
    bare = Dataset()
    bare.update(dx12)
    np.testing.assert_array_equal(read_display_image(bare), expected)


# ------------------------------------------------------------------------- failures
def test_no_pixel_data_is_a_decode_error(dx12: Dataset) -> None:
    del dx12.PixelData
    with pytest.raises(DecodeError, match="no pixel data"):
        read_display_image(dx12)


def test_unsupported_photometric_is_a_decode_error(dx12: Dataset) -> None:
    dx12.PhotometricInterpretation = "HSV"
    with pytest.raises(DecodeError, match="photometric interpretation 'HSV'"):
        read_display_image(dx12)


def test_syntax_without_decoder_is_a_decode_error(dx12: Dataset) -> None:
    dx12.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    dx12["PixelData"].VR = "OB"
    dx12.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(DecodeError, match="MPEG2"):
        read_display_image(dx12)


def test_corrupt_compressed_data_is_a_decode_error(dx12: Dataset) -> None:
    compressed = _compressed(dx12, JPEG2000Lossless)
    compressed.PixelData = encapsulate([b"\xff\x4f\xff\x51" + os.urandom(40)])
    with pytest.raises(DecodeError, match="could not be decoded"):
        read_display_image(compressed)


def test_explicit_little_endian_is_default_when_meta_missing_syntax(dx12: Dataset) -> None:
    del dx12.file_meta.TransferSyntaxUID
    assert read_display_image(dx12).shape == (48, 64)
    assert dx12.file_meta.get("TransferSyntaxUID") in (None, ExplicitVRLittleEndian)


@pytest.mark.parametrize("center, width", [(2048.0, 4096.0), (1000.0, 300.0), (-50.5, 2.0), (30000.0, 70000.0)])
def test_linear_window_fast_path_matches_pydicom(center: float, width: float) -> None:
    """The float32 one-pass LINEAR window gives pydicom's apply_voi_lut output scaled to [0, 1]."""
    from pydicom.pixels import apply_voi_lut

    from models.display_image import linear_window

    values = np.random.default_rng(1).integers(-2000, 66000, size=(64, 80)).astype(np.float64)
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth, ds.PixelRepresentation, ds.BitsStored = center, width, 1, 16
    ds.PhotometricInterpretation = "MONOCHROME2"
    reference = apply_voi_lut(values, ds, index=0)
    ends = apply_voi_lut(np.array([center - 1e7, center + 1e7]), ds, index=0)
    expected = (reference - ends.min()) / (ends.max() - ends.min())
    np.testing.assert_allclose(linear_window(values, center, width), expected, atol=2e-6)
