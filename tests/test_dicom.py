"""DICOM input through pydicom and the pylibjpeg plug-ins, on pydicom's bundled test files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from primis.errors import PrimisError
from primis.io.dicom import encode_dicom
from primis.io.images import read_image, read_source
from primis.io.pixels import gray


def bundled(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(path)


# (file, transfer syntax UID, plug-in that decodes it)
SYNTAXES = [
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", "RLE lossless"),
    ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "JPEG-LS lossless"),
    ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", "JPEG 2000 lossless"),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", "JPEG 2000"),
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", "JPEG extended 12-bit"),
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", "JPEG baseline (YBR colour)"),
    ("SC_rgb_jpeg_gdcm.dcm", "1.2.840.10008.1.2.4.70", "JPEG lossless"),
]


@pytest.mark.parametrize(("name", "syntax", "_what"), SYNTAXES)
def test_compressed_transfer_syntaxes_decode(name, syntax, _what):
    image = read_source(bundled(name))
    assert image.details["transfer_syntax"] == syntax
    assert image.pixels.ndim == 2 and image.pixels.size > 0
    assert image.pixels.max() > image.pixels.min()


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"]
)
def test_lossless_syntaxes_match_the_uncompressed_pixels(name):
    reference = read_source(bundled("MR_small.dcm")).pixels
    assert np.array_equal(read_source(bundled(name)).pixels, reference)


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str, **attributes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-12345"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_is_inverted_and_rescale_and_window_are_recorded(tmp_path):
    pixels = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    path = _write_dicom(
        tmp_path / "m1.dcm",
        pixels,
        "MONOCHROME1",
        RescaleSlope="2",
        RescaleIntercept="-1024",
        WindowCenter="1000",
        WindowWidth="2000",
    )
    unit, mapping = read_image(path)
    assert mapping.invert and unit[0, 0] == 1.0 and unit[0, -1] == 0.0
    assert np.array_equal(mapping.inverse(unit), pixels)
    details = read_source(path).details
    assert details["rescale_slope"] == 2.0 and details["rescale_intercept"] == -1024.0
    assert details["window_center"] == 1000.0 and details["bits_stored"] == 12
    assert "Doe" not in str(details) and "PID" not in str(details)


def test_rle_written_here_round_trips(tmp_path):
    pixels = (np.random.default_rng(0).random((32, 40)) * 4095).astype(np.uint16)
    path = _write_dicom(tmp_path / "plain.dcm", pixels, "MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    assert np.array_equal(read_source(tmp_path / "rle.dcm").pixels, pixels)


def test_multi_frame_and_broken_dicom_are_rejected_clearly(tmp_path):
    with pytest.raises(PrimisError, match="multi-frame"):
        read_source(bundled("rtdose.dcm"))
    truncated = tmp_path / "cut.dcm"
    data = bundled("MR_small_RLE.dcm").read_bytes()
    truncated.write_bytes(data[: len(data) - 600])
    with pytest.raises(PrimisError, match=r"cut\.dcm"):
        read_source(truncated)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"not dicom at all")
    with pytest.raises(PrimisError, match="not a DICOM"):
        read_source(fake)


def test_old_files_without_preamble_or_file_meta_are_read(tmp_path):
    pixels = np.tile(np.arange(0, 1000, 25, dtype=np.uint16), (12, 1))
    path = _write_dicom(tmp_path / "new.dcm", pixels, "MONOCHROME2", Modality="CR")
    ds = pydicom.dcmread(path)
    ds.StudyDate = "19950101"  # a group 0008 element first, as such files begin
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "old.dcm"
    ds.save_as(bare, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[:2] == b"\x08\x00" and b"DICM" not in bare.read_bytes()[:132]
    unit, mapping = read_image(bare)
    assert np.array_equal(mapping.inverse(unit), pixels)
    assert read_source(bare).details["transfer_syntax"] == "1.2.840.10008.1.2"
    (tmp_path / "junk.dcm").write_bytes(b"\x08\x00" + bytes(30))
    with pytest.raises(PrimisError, match="DICOM"):
        read_image(tmp_path / "junk.dcm")


def test_ybr_full_gives_its_luminance_unchanged(tmp_path):
    luminance = np.tile(np.arange(16, 236, 5, dtype=np.uint8), (10, 1))
    path = _write_dicom(tmp_path / "mono.dcm", luminance.astype(np.uint16), "MONOCHROME2")
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ycbcr = np.stack([luminance, np.full_like(luminance, 128), np.full_like(luminance, 128)], -1)
    ds.PixelData = ycbcr.tobytes()
    ds.save_as(tmp_path / "ybr.dcm")
    # pydicom already returns RGB by default; converting that "YBR" again changed grey levels
    assert np.array_equal(read_source(tmp_path / "ybr.dcm").pixels, luminance)
    colour = read_source(bundled("SC_rgb_jpeg_dcmtk.dcm")).pixels  # YBR_FULL, JPEG baseline
    reference = gray(pydicom.dcmread(bundled("SC_rgb_jpeg_dcmtk.dcm")).pixel_array)
    assert np.abs(colour.astype(int) - reference).max() <= 2  # Y against luma of the RGB


def test_jpeg2000_colour_palette_and_big_endian_files_are_read():
    rct = bundled("GDCMJ2K_TextGBR.dcm")  # YBR_RCT: the JPEG 2000 decoder returns RGB
    assert np.array_equal(read_source(rct).pixels, gray(pydicom.dcmread(rct).pixel_array))
    palette = read_source(bundled("examples_palette.dcm"))
    assert palette.pixels.ndim == 2 and palette.pixels.std() > 0
    assert palette.details["photometric"] == "PALETTE_COLOR"
    big = read_source(bundled("MR_small_bigendian.dcm")).pixels
    assert big.dtype.isnative and np.array_equal(big, read_source(bundled("MR_small.dcm")).pixels)


def test_big_endian_arrays_are_read_as_native(tmp_path):
    pixels = np.arange(600, dtype=">u2").reshape(20, 30)
    np.save(tmp_path / "big.npy", pixels)
    image = read_source(tmp_path / "big.npy")
    assert image.pixels.dtype == np.uint16 and np.array_equal(image.pixels, pixels)


def test_32_bit_dicom_round_trips_and_float_pixel_data_is_refused(tmp_path):
    pixels = (np.arange(1200, dtype=np.uint32).reshape(30, 40) * 70_000) % (2**31)
    details = {"photometric": "MONOCHROME2", "bits_stored": 32}
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(pixels, details, None, "0" * 32)))
    assert ds.BitsAllocated == 32 and np.array_equal(ds.pixel_array, pixels)
    floating = _write_dicom(tmp_path / "f.dcm", np.zeros((4, 4), np.uint16), "MONOCHROME2")
    ds = pydicom.dcmread(floating)
    del ds.PixelData, ds.PixelRepresentation
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.FloatPixelData = np.linspace(0, 1, 16, dtype=np.float32).tobytes()
    ds.save_as(floating)
    with pytest.raises(PrimisError, match="floating-point"):
        read_source(floating)


def test_an_undecodable_file_says_why_each_decoder_failed():
    with pytest.raises(PrimisError) as failure:
        read_source(bundled("JPEG-lossy.dcm"))  # a damaged JPEG stream
    message = str(failure.value)
    assert "\n" not in message and "pylibjpeg" in message and "1.2.840.10008.1.2.4.51" in message


def test_an_inverse_presentation_lut_is_seen_as_shown_and_kept_on_output(tmp_path):
    pixels = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (8, 1))
    path = _write_dicom(tmp_path / "dx.dcm", pixels, "MONOCHROME2", PresentationLUTShape="INVERSE")
    unit, mapping = read_image(path)
    assert mapping.invert and unit[0, 0] == 1.0 and np.array_equal(mapping.inverse(unit), pixels)
    details = read_source(path).details
    ds = pydicom.dcmread(io.BytesIO(encode_dicom(pixels, details, None, "0" * 32)))
    assert ds.PresentationLUTShape == "INVERSE" and ds.PhotometricInterpretation == "MONOCHROME2"
