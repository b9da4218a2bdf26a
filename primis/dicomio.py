"""DICOM output: the authorized reconstruction as DICOM, with the original header or a
de-identified one (DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile).

The original header (everything but the pixel data) travels only inside the key, and only when
the data owner asks for it (`primis ambiguate --keep-header`).
"""

from __future__ import annotations

import datetime
import io
from pathlib import Path

import numpy as np

from primis.errors import PrimisError

# At most 64 characters: DeidentificationMethod is an LO element.
DEIDENTIFICATION_METHOD = "PRIMIS reconstruction; new header, PS3.15 Annex E basic profile"
BURNED_IN_METHOD = "PRIMIS reconstruction; new header; burned-in text kept"


def original_header(path: Path) -> bytes:
    """The input's DICOM header without pixel data, serialised as a DICOM file."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


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
    allocated = 8 if pixels.dtype.itemsize == 1 else 16
    if pixels.dtype.itemsize > 2:
        raise PrimisError(f"cannot store {pixels.dtype} pixels in DICOM; use another output")
    stored = min(int(details.get("bits_stored", allocated)), allocated)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if "rescale_slope" in details:
        ds.RescaleSlope = f"{details['rescale_slope']:g}"
        ds.RescaleIntercept = f"{details['rescale_intercept']:g}"
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW" if allocated == 16 else "OB"


def _deidentified(ds, burned_in: bool | None) -> None:
    """The de-identification attributes of a new header. Pixels with burned-in annotation may
    show identifying text, so such an output says so instead of claiming identity removed."""
    import pydicom

    if burned_in is not None:
        ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    if burned_in:
        ds.PatientIdentityRemoved = "NO"
        ds.DeidentificationMethod = BURNED_IN_METHOD
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
        ds.ImageType = ["DERIVED", "SECONDARY"]
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
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PrimisError(f"cannot write the DICOM output ({reason})") from None
    return buffer.getvalue()
