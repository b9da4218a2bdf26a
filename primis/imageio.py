"""Reading and writing images, and the intensity mapping between file values and model range.

:func:`read_source` decodes any supported input into a 2-D array plus private details;
:class:`IntensityMapping` takes it to [0, 1] and back, and is what the key records so the
authorized output gets the input's dtype, range and orientation.

Inputs are checked against `primis.limits` from their headers (file size, then rows x columns)
before any pixel is decoded, so a small file that declares a huge image is refused cheaply.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from primis.errors import PrimisError
from primis.limits import MAX_FILE_BYTES, MAX_PIXELS

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
INPUT_SUFFIXES = PIL_SUFFIXES | DICOM_SUFFIXES | {".tif", ".tiff", ".npy"}
Image.MAX_IMAGE_PIXELS = None  # checked against MAX_PIXELS before decoding (`_read_pil`)
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"


@dataclass(frozen=True)
class IntensityMapping:
    """Affine map from the file's values [low, high] to the model's [0, 1], and back.

    ``invert`` flips the scale (DICOM MONOCHROME1, where high values are dark), so the model
    always sees bright bone on a dark background.
    """

    dtype: str
    low: float
    high: float
    invert: bool = False

    @classmethod
    def of(cls, pixels: np.ndarray, invert: bool = False) -> IntensityMapping:
        low, high = float(pixels.min()), float(pixels.max())
        return cls(str(pixels.dtype), low, high if high > low else low + 1.0, invert)

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        unit = (pixels.astype(np.float64) - self.low) / (self.high - self.low)
        return (1.0 - unit if self.invert else unit).astype(np.float32)

    def inverse(self, unit: np.ndarray) -> np.ndarray:
        """[0,1] pixels back to the input's dtype and range (in float64, a band of rows at a
        time, so a large image needs no full-size float64 copies)."""
        dtype = np.dtype(self.dtype)
        out = np.empty(unit.shape, dtype=dtype)
        step = max(1, (1 << 20) // max(1, unit[0].size)) if unit.ndim > 1 else max(1, len(unit))
        for start in range(0, len(unit), step):
            band = np.clip(unit[start : start + step].astype(np.float64), 0.0, 1.0)
            values = (1.0 - band if self.invert else band) * (self.high - self.low) + self.low
            if dtype.kind in "ui":
                values = np.clip(np.rint(values), self.low, self.high)
            out[start : start + step] = values
        return out

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "low": self.low, "high": self.high, "invert": self.invert}

    @classmethod
    def from_dict(cls, data: dict) -> IntensityMapping:
        dtype = np.dtype(str(data["dtype"]))
        if dtype.kind not in "uif" or not float(data["high"]) > float(data["low"]):
            raise ValueError("invalid intensity mapping")
        return cls(dtype.name, float(data["low"]), float(data["high"]), bool(data["invert"]))


@dataclass(frozen=True)
class SourceImage:
    """A decoded input: 2-D pixels in the file's dtype, and private facts about the file.

    ``details`` (format, DICOM photometric interpretation, rescale, window, bit depth) is
    private: it goes into the key, never into the public file.
    """

    pixels: np.ndarray
    details: dict
    invert: bool = False

    @property
    def mapping(self) -> IntensityMapping:
        return IntensityMapping.of(self.pixels, self.invert)


def _gray(pixels: np.ndarray) -> np.ndarray:
    """Colour (last axis 3 or 4) to luminance (ITU-R 601), keeping the dtype."""
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        luma = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.rint(luma).astype(pixels.dtype) if pixels.dtype.kind in "ui" else luma
    return pixels


def _check_size(pixels: int, path: Path) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS pixels (all pages or frames
    together), before it is decoded."""
    MAX_PIXELS.check(pixels, str(path))


def _read_pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        _check_size(image.height * image.width * getattr(image, "n_frames", 1), path)
        image.load()
        if image.mode.startswith("I;16"):
            return np.asarray(image).astype(np.uint16)
        if image.mode in ("L", "I", "F"):
            return np.asarray(image)
        return np.asarray(image.convert("L"))


def _read_tiff(path: Path) -> np.ndarray:
    import logging

    import tifffile

    # A damaged file comes back as one PrimisError line; tifffile's own log would add more.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        axes = zip(series.axes, series.shape, strict=True)
        _check_size(math.prod(size for axis, size in axes if axis != "S"), path)
        pixels = np.squeeze(tiff.asarray())
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        raise PrimisError(f"{path}: multi-page TIFF ({pixels.shape[0]} pages) is not supported")
    return _gray(pixels)


def _numbers(value) -> float | list[float]:
    """A DICOM decimal string or multi-value as float(s)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return [float(v) for v in value]


def _read_dicom(path: Path) -> SourceImage:
    import logging
    import warnings

    import pydicom
    from pydantic import ValidationError
    from pydicom.errors import InvalidDicomError

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
    if "PixelData" not in ds:
        raise PrimisError(f"{path}: DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise PrimisError(f"{path}: multi-frame DICOM ({frames} frames) is not supported")
    _check_size(int(ds.Rows) * int(ds.Columns), path)
    try:
        pixels = ds.pixel_array
    except Exception as err:  # decoders raise many types; all mean "cannot decode"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PrimisError(
            f"{path}: cannot decode DICOM pixel data (transfer syntax {syntax}): {reason}"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if photometric.startswith("YBR") and pixels.ndim == 3:
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        pixels = _gray(pixels)
    from primis.formats import Source, validation_reason

    modality = "".join(c for c in str(ds.get("Modality", "") or "").upper() if c.isalnum())
    burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    details = {
        "format": "dicom",
        "transfer_syntax": syntax,
        "photometric": photometric,
        "bits_allocated": int(ds.get("BitsAllocated", 8 * pixels.dtype.itemsize)),
        "bits_stored": int(ds.get("BitsStored", 8 * pixels.dtype.itemsize)),
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "rescale_slope": float(ds.get("RescaleSlope", 1.0) or 1.0),
        "rescale_intercept": float(ds.get("RescaleIntercept", 0.0) or 0.0),
        "modality": modality[:16],
    }
    if burned_in in ("YES", "NO"):
        details["burned_in_annotation"] = burned_in == "YES"
    for keyword, name in (("WindowCenter", "window_center"), ("WindowWidth", "window_width")):
        if ds.get(keyword) is not None:
            details[name] = _numbers(ds.get(keyword))
    try:
        details = Source.model_validate(details).model_dump(exclude_none=True)
    except ValidationError as err:
        reason = validation_reason(err)
        raise PrimisError(f"{path}: unusable DICOM attributes ({reason})") from None
    return SourceImage(pixels, details, invert=photometric == "MONOCHROME1")


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


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def is_dicom(path: Path) -> bool:
    """A DICOM file by its suffix or, whatever its suffix, by the DICM marker."""
    try:
        return Path(path).suffix.lower() in DICOM_SUFFIXES or (
            path.is_file() and _looks_like_dicom(path)
        )
    except OSError:
        return False


def is_image_file(path: Path) -> bool:
    """A supported image by its suffix, or an extension-less DICOM file (as PACS exports)."""
    suffix = path.suffix.lower()
    if suffix in INPUT_SUFFIXES:
        return True
    try:
        return suffix == "" and _looks_like_dicom(path)
    except OSError:
        return False


def read_source(path: Path) -> SourceImage:
    """Decode any supported input into a 2-D grayscale :class:`SourceImage`.

    PNG/JPEG/BMP through Pillow, TIFF through tifffile, ``.npy`` through NumPy (no pickles),
    DICOM through pydicom with the pylibjpeg plug-ins (JPEG baseline/extended/lossless,
    JPEG-LS, JPEG 2000, RLE). Colour becomes luminance.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        MAX_FILE_BYTES.check(path.stat().st_size, str(path))
        if is_dicom(path):
            image = _read_dicom(path)
        elif suffix == ".npy":
            image = SourceImage(_read_npy(path), {"format": "npy"})
        elif suffix in (".tif", ".tiff"):
            image = SourceImage(_read_tiff(path), {"format": "tiff"})
        elif suffix in PIL_SUFFIXES:
            image = SourceImage(_read_pil(path), {"format": suffix.lstrip(".")})
        else:
            raise PrimisError(f"{path}: unsupported image type '{suffix or path.name}'")
    except PrimisError:
        raise
    except FileNotFoundError:
        raise PrimisError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PrimisError(f"{path}: is a folder, not an image") from None
    except Exception as err:  # any decoder failure is a bad input, reported in one line
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PrimisError(f"{path}: cannot read image ({reason})") from None
    return _checked(image, path)


def source_from_array(pixels: np.ndarray, name: str = "image") -> SourceImage:
    """An image given as an array, checked as a decoded file is (colour becomes luminance)."""
    pixels = np.asarray(pixels)
    if pixels.dtype.kind in "uif":
        pixels = _gray(pixels)
    return _checked(SourceImage(pixels, {}), Path(name))


def _checked(image: SourceImage, path: Path) -> SourceImage:
    """A decoded image that is 2-D, numeric, finite and within the pixel limit (booleans
    become uint8), or a PrimisError that names ``path``."""
    pixels = image.pixels
    if pixels.ndim != 2:
        raise PrimisError(f"{path}: expected a 2-D grayscale image, got shape {pixels.shape}")
    if pixels.size == 0 or pixels.dtype.kind not in "uifb":
        raise PrimisError(f"{path}: empty or non-numeric image")
    _check_size(pixels.size, path)
    if pixels.dtype.kind == "b":
        pixels = pixels.astype(np.uint8)
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise PrimisError(f"{path}: image contains NaN or infinite values")
    if not math.isfinite(float(pixels.max()) - float(pixels.min())):
        raise PrimisError(f"{path}: values span more than the floating-point range")
    return SourceImage(pixels, image.details, image.invert)


def _read_npy(path: Path) -> np.ndarray:
    """A NumPy array, its shape checked from the header first; never a pickle."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(handle)
    if dtype.hasobject:
        raise PrimisError(f"{path}: .npy holds Python objects, not pixels")
    colour = len(shape) == 3 and shape[-1] in (3, 4)
    _check_size(math.prod(shape[:2] if colour else shape), path)
    return _gray(np.load(path, allow_pickle=False))


def read_pixels(path: Path) -> np.ndarray:
    """A 2-D grayscale array with the file's own dtype (colour becomes luminance)."""
    return read_source(path).pixels


def read_image(path: Path) -> tuple[np.ndarray, IntensityMapping]:
    """The image as float32 in [0, 1] and the mapping that restores the file's values."""
    image = read_source(path)
    mapping = image.mapping
    return mapping.forward(image.pixels), mapping


def default_mode() -> int:
    """0666 less the process umask: the mode of a new file that holds nothing secret."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def write_temporary(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` durably to a temporary file beside ``path`` (named
    ``.NAME.PID.XXXXXXXX.part``, so a rerun can tell a dead writer's leftovers) and return it.
    ``mode`` defaults to :func:`default_mode`; secrets pass 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".part"
    )
    try:
        os.fchmod(fd, default_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    tmp = write_temporary(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encode_image(pixels: np.ndarray, suffix: str) -> bytes:
    """Serialise a 2-D array as PNG or TIFF (8 or 16 bits unsigned) or as .npy (any dtype)."""
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, pixels, allow_pickle=False)
    elif pixels.dtype not in (np.uint8, np.uint16):
        raise PrimisError(f"cannot store {pixels.dtype} pixels as {suffix}; use .npy")
    elif suffix in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(buffer, pixels)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


OUTPUT_SUFFIXES = (".dcm", ".png", ".tif", ".npy")  # what `disambiguate` may write


def output_suffix(details: dict, dtype: np.dtype) -> str:
    """Where restored pixels go: TIFF and .npy inputs keep their type; other 8/16-bit
    unsigned images become PNG (lossless); anything else becomes .npy."""
    kind = details.get("format")
    if kind == "npy" or np.dtype(dtype) not in (np.uint8, np.uint16):
        return ".npy"
    return ".tif" if kind == "tiff" else ".png"


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the bottom and right edges up to a multiple (edge-pad tiny images)."""
    h, w = image.shape
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return image
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(image, ((0, ph), (0, pw)), mode=mode)


def list_images(paths: list[Path]) -> list[Path]:
    """Expand files and folders (recursively) into the image files they hold, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file() and is_image_file(p))
        else:
            found.append(path)
    return found
