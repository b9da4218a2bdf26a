"""DICOM in and out: reading a DICOM input, and writing the authorized reconstruction as
DICOM with the original header or a de-identified one (DICOM PS3.15 Annex E, Basic Application
Level Confidentiality Profile).

Reading goes through pydicom with the pylibjpeg plug-ins (JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000, RLE), also for old files without preamble and file meta. The original
header (everything but the pixel data) travels only inside the key, and only when the data
owner asks for it (`primis ambiguate --keep-header`).
"""

from __future__ import annotations

import datetime
import io
import zlib
from pathlib import Path

import numpy as np

from primis.errors import PrimisError, one_line
from primis.io.pixels import SourceImage, check_size, gray
from primis.limits import MAX_PIXELS

DICOM_SUFFIXES = {".dcm", ".dicom"}
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"
# At most 64 characters: DeidentificationMethod is an LO element.
DEIDENTIFICATION_METHOD = "PRIMIS reconstruction; new header, PS3.15 Annex E basic profile"
BURNED_IN_METHOD = "PRIMIS reconstruction; new header; burned-in text kept"
UNKNOWN_TEXT_METHOD = "PRIMIS reconstruction; new header; pixels not checked for text"


def _numbers(value) -> float | list[float]:
    """A DICOM decimal string or multi-value as float(s)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return [float(v) for v in value]


def read_dicom(path: Path) -> SourceImage:
    """A DICOM file's single frame as a 2-D grayscale :class:`SourceImage`, with its private
    details (transfer syntax, photometric interpretation, rescale, window, bit depth)."""
    import logging
    import warnings

    import pydicom
    from pydantic import ValidationError
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, pixel_array

    # Decoder failures come back as one PrimisError line; pydicom's own log would repeat them.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="pydicom")

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        syntax = str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
        if syntax == DEFLATED_DICOM:
            _check_inflated(path, 132 + 12 + int(meta.FileMetaInformationGroupLength))
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        ds = _read_bare_dataset(path)
        syntax = str(ds.file_meta.TransferSyntaxUID)
    _check_image_header(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    try:
        # as_rgb off: YBR_FULL(_422) stays YCbCr, whose first channel is the luminance itself
        pixels = pixel_array(ds, as_rgb=False)
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
    except Exception as err:  # decoders raise many types; all mean "cannot decode"
        reason = one_line(err)
        raise PrimisError(
            f"{path}: cannot decode DICOM pixel data (transfer syntax {syntax}): {reason}"
        ) from None
    if photometric in ("YBR_FULL", "YBR_FULL_422") and pixels.ndim == 3:
        pixels = pixels[..., 0]
    pixels = gray(pixels)  # RGB, palette colour, and JPEG 2000's YBR_ICT/RCT (decoded as RGB)
    from primis.formats import Source, validation_reason

    modality = "".join(c for c in str(ds.get("Modality", "") or "").upper() if c.isalnum())
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    details = {
        "format": "dicom",
        "transfer_syntax": syntax,
        "photometric": photometric.replace(" ", "_"),
        "bits_allocated": int(ds.get("BitsAllocated", 8 * pixels.dtype.itemsize)),
        "bits_stored": int(ds.get("BitsStored", 8 * pixels.dtype.itemsize)),
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "rescale_slope": float(ds.get("RescaleSlope", 1.0) or 1.0),
        "rescale_intercept": float(ds.get("RescaleIntercept", 0.0) or 0.0),
        "modality": modality[:16],
    }
    if burned_in in ("YES", "NO"):
        details["burned_in_annotation"] = burned_in == "YES"
    # Shown inverted (some DX and mammography): the model sees it as shown, as for MONOCHROME1
    inverse = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    if inverse:
        details["presentation_lut_inverse"] = True
    for keyword, name in (("WindowCenter", "window_center"), ("WindowWidth", "window_width")):
        if ds.get(keyword) is not None:
            details[name] = _numbers(ds.get(keyword))
    try:
        details = Source.model_validate(details).model_dump(exclude_none=True)
    except ValidationError as err:
        reason = validation_reason(err)
        raise PrimisError(f"{path}: unusable DICOM attributes ({reason})") from None
    return SourceImage(pixels, details, invert=(photometric == "MONOCHROME1") != inverse)


_DISPLAY_KEYWORDS = (
    "ModalityLUTSequence",
    "VOILUTSequence",
    "VOILUTFunction",
    "PresentationLUTSequence",
    "PresentationLUTShape",
    "RescaleType",
)


def content_fingerprint(path: Path) -> str:
    """SHA-256 of what a DICOM instance shows: its decoded pixels (dtype and shape included)
    and every attribute that changes how they are shown (photometric interpretation, bit
    depth, rescale, window, LUTs, presentation LUT), not its transfer syntax or identifiers.
    The same image sent again in another transfer syntax has the same fingerprint; a
    correction (e.g. MONOCHROME1 for MONOCHROME2) has another."""
    import hashlib
    import json

    import pydicom

    source = read_dicom(path)
    shown = {k: v for k, v in source.details.items() if k != "transfer_syntax"}
    digest = hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode())
    digest.update(f"{source.pixels.dtype.str}{source.pixels.shape}".encode())
    digest.update(np.ascontiguousarray(source.pixels).tobytes())
    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    for keyword in _DISPLAY_KEYWORDS:
        if keyword in header:
            digest.update(f"{keyword}={header[keyword].value!r}".encode())
    return digest.hexdigest()


def _check_image_header(ds, path: Path) -> None:
    """What PRIMIS refuses from a DICOM data set's header alone: no pixel data or floating
    point pixel data, multi-frame, no Rows and Columns, too many pixels."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise PrimisError(f"{path}: floating-point DICOM pixel data is not supported")
    if "PixelData" not in ds:
        raise PrimisError(f"{path}: DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise PrimisError(f"{path}: multi-frame DICOM ({frames} frames) is not supported")
    if "Rows" not in ds or "Columns" not in ds:
        raise PrimisError(f"{path}: DICOM pixel data without Rows and Columns")
    check_size(int(ds.Rows) * int(ds.Columns), path)


def check_dicom_header(path: Path) -> None:
    """Fail fast (a PrimisError) on a DICOM file with file meta that `read_dicom` would refuse
    from its header alone (see `_check_image_header`), without decoding its pixels: what the
    DICOM node checks before it acknowledges an instance it will share later."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        if str(meta.get("TransferSyntaxUID", "")) == DEFLATED_DICOM:
            _check_inflated(path, 132 + 12 + int(meta.FileMetaInformationGroupLength))
        ds = pydicom.dcmread(path, defer_size=1024)
    except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as err:
        raise PrimisError(f"{path}: not a readable DICOM instance ({one_line(err)})") from None
    _check_image_header(ds, path)


def _check_inflated(path: Path, start: int) -> None:
    """Refuse a deflated DICOM data set that inflates beyond what MAX_PIXELS allows, counting
    in bounded chunks (pydicom would inflate it whole)."""
    cap = 8 * MAX_PIXELS.value() + (1 << 24)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while chunk := handle.read(1 << 16):
            while chunk:
                total += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
                if total > cap:
                    raise PrimisError(
                        f"{path}: deflated DICOM data set inflates beyond {cap} bytes "
                        f"(set {MAX_PIXELS.variable} to change it)"
                    )


def _read_bare_dataset(path: Path):
    """An old-style DICOM file without preamble and file meta (ACR-NEMA style), which starts
    with an element of group 0008 in little-endian byte order; its transfer syntax is the one
    pydicom finds the data set in."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    with open(path, "rb") as handle:
        start = handle.read(8)
    if len(start) < 8 or start[:2] != b"\x08\x00":
        raise PrimisError(f"{path}: not a DICOM file")
    try:
        ds = pydicom.dcmread(path, force=True)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if ds.is_implicit_VR else ExplicitVRLittleEndian
        )
    except Exception:  # pydicom raises many types on arbitrary bytes
        raise PrimisError(f"{path}: not a DICOM file") from None
    return ds


def looks_like_dicom(path: Path) -> bool:
    """Whether the file has the DICM marker after its 128-byte preamble."""
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def is_dicom(path: Path) -> bool:
    """A DICOM file by its suffix or, whatever its suffix, by the DICM marker."""
    try:
        return Path(path).suffix.lower() in DICOM_SUFFIXES or (
            path.is_file() and looks_like_dicom(path)
        )
    except OSError:
        return False


def original_header(path: Path) -> bytes:
    """The input's DICOM header without pixel data, serialised as a DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:  # no preamble and file meta (read as `read_dicom` reads it)
        ds = _read_bare_dataset(path)
        for pixels in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if pixels in ds:
                delattr(ds, pixels)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _own_rescale_units(sop_class) -> bool:
    """Whether the SOP class's image module defines the rescale's units itself (CT: Hounsfield
    units unless Rescale Type says otherwise; MR and PET likewise), so that PRIMIS must not add
    a Rescale Type of its own."""
    from pydicom.uid import UID

    name = UID(str(sop_class)).name
    return any(kind in name for kind in ("CT Image", "MR Image", "PET Image"))


def _set_pixels(ds, pixels: np.ndarray, details: dict) -> None:
    from pydicom.uid import ExplicitVRLittleEndian

    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    photometric = details.get("photometric", "MONOCHROME2")
    ds.PhotometricInterpretation = (
        photometric if photometric in ("MONOCHROME1", "MONOCHROME2") else "MONOCHROME2"
    )
    for colour_only in ("PlanarConfiguration", "NumberOfFrames", "PixelPaddingValue"):
        if colour_only in ds:
            delattr(ds, colour_only)
    if pixels.dtype.kind not in "ui" or pixels.dtype.itemsize > 4:
        raise PrimisError(f"cannot store {pixels.dtype} pixels in DICOM; use another output")
    allocated = 8 * pixels.dtype.itemsize
    stored = min(int(details.get("bits_stored", allocated)), allocated)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if details.get("presentation_lut_inverse"):
        ds.PresentationLUTShape = "INVERSE"
    if "rescale_slope" in details:
        ds.RescaleSlope = f"{details['rescale_slope']:g}"
        ds.RescaleIntercept = f"{details['rescale_intercept']:g}"
        if "RescaleType" not in ds and not _own_rescale_units(ds.SOPClassUID):
            ds.RescaleType = "US"  # Type 1C with a rescale (Modality LUT): unspecified
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"


def _deidentified(ds, burned_in: bool | None) -> None:
    """The de-identification attributes of a new header, claiming only what was done: the
    header is new, the pixels are the input's. Identity removed (and the Basic Application
    Confidentiality Profile code) only where the input said BurnedInAnnotation NO; pixels with
    burned-in annotation, or of unknown annotation (a non-DICOM input, or a DICOM input that
    does not say), may show identifying text, so such an output says identity not removed."""
    import pydicom

    if burned_in is not None:
        ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    if burned_in is not False:
        ds.PatientIdentityRemoved = "NO"
        ds.DeidentificationMethod = BURNED_IN_METHOD if burned_in else UNKNOWN_TEXT_METHOD
        return
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "113100", "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [code]


def encode_dicom(pixels: np.ndarray, details: dict, header: bytes | None, file_id: str) -> bytes:
    """A DICOM file (Explicit VR Little Endian) holding ``pixels``.

    With ``header`` (the original one, from the key) every attribute is kept except a new SOP
    Instance UID and ImageType DERIVED; without it, a fresh Secondary Capture header carries no
    patient, study or device data, only what displays the pixels.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    if header is not None:
        try:
            ds = pydicom.dcmread(io.BytesIO(header), force=True)
        except Exception:  # pydicom raises many types; all mean "not a usable header"
            ds = None
        if ds is None or "SOPClassUID" not in ds:
            raise PrimisError("the key's stored DICOM header is unreadable")
        # Values 3 and on (e.g. AXIAL for CT, required by the CT and MR image modules) stay.
        ds.ImageType = ["DERIVED", "SECONDARY", *list(ds.get("ImageType") or [])[2:]]
        ds.DerivationDescription = "PRIMIS authorized reconstruction"
    else:
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientName, ds.PatientID = "ANONYMOUS", f"PRIMIS-{file_id[:16]}"
        ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ""
        ds.AccessionNumber = ds.ReferringPhysicianName = ds.StudyID = ""
        ds.Modality = details.get("modality", "OT") or "OT"
        ds.ConversionType = "WSD"
        ds.SeriesNumber, ds.InstanceNumber = 1, 1
        ds.ImageType = ["DERIVED", "SECONDARY"]
        # Type 2C in General Series and General Image: empty (unknown) rather than absent.
        ds.Laterality = ds.PatientOrientation = ""
        _deidentified(ds, details.get("burned_in_annotation"))
        for keyword, name in (("WindowCenter", "window_center"), ("WindowWidth", "window_width")):
            if name in details:
                ds.__setattr__(keyword, details[name])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceCreationDate = datetime.date.today().strftime("%Y%m%d")
    _set_pixels(ds, pixels, details)
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception as err:  # a stored header with values pydicom cannot write back
        reason = one_line(err)
        raise PrimisError(f"cannot write the DICOM output ({reason})") from None
    return buffer.getvalue()
