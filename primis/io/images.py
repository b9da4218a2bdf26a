"""Reading any supported input, and writing restored pixels as PNG, TIFF or .npy.

:func:`read_source` decodes an input into a 2-D :class:`~primis.io.pixels.SourceImage`: PNG,
JPEG, WebP and BMP through Pillow, TIFF through tifffile, ``.npy`` through NumPy (no pickles),
DICOM through `primis.io.dicom`. Inputs are checked against `primis.limits` from their headers
(file size, then rows x columns) before any pixel is decoded, so a small file that declares a
huge image is refused cheaply.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from primis.errors import PrimisError, one_line
from primis.io.dicom import DICOM_SUFFIXES, is_dicom, looks_like_dicom, read_dicom
from primis.io.pixels import IntensityMapping, SourceImage, check_size, gray
from primis.limits import MAX_FILE_BYTES

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp"}
INPUT_SUFFIXES = PIL_SUFFIXES | DICOM_SUFFIXES | {".tif", ".tiff", ".npy"}
Image.MAX_IMAGE_PIXELS = None  # checked against MAX_PIXELS before decoding (`_read_pil`)


def _read_pil(path: Path) -> np.ndarray:
    """Pixels as a viewer shows them: an EXIF orientation (phone photos of films) is applied."""
    with Image.open(path) as image:
        check_size(image.height * image.width * getattr(image, "n_frames", 1), path)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy where there is no orientation
        if image.mode.startswith("I;16"):
            return np.asarray(image).astype(np.uint16)
        if image.mode in ("L", "I", "F"):
            return np.asarray(image)
        return np.asarray(image.convert("L"))


def _read_tiff(path: Path) -> SourceImage:
    """A TIFF's single page (any compression imagecodecs decodes); MINISWHITE is inverted for
    the model, as DICOM MONOCHROME1 is, and restored as MINISWHITE."""
    import logging

    import tifffile

    # A damaged file comes back as one PrimisError line; tifffile's own log would add more.
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        axes = zip(series.axes, series.shape, strict=True)
        check_size(math.prod(size for axis, size in axes if axis != "S"), path)
        pixels = np.squeeze(tiff.asarray())
        white = tiff.pages[0].photometric == tifffile.PHOTOMETRIC.MINISWHITE
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        raise PrimisError(f"{path}: multi-page TIFF ({pixels.shape[0]} pages) is not supported")
    details = {"format": "tiff", "photometric": "MINISWHITE"} if white else {"format": "tiff"}
    return SourceImage(gray(pixels), details, invert=white)


def is_image_file(path: Path) -> bool:
    """A supported image by its suffix, or an extension-less DICOM file (as PACS exports)."""
    suffix = path.suffix.lower()
    if suffix in INPUT_SUFFIXES:
        return True
    try:
        return suffix == "" and looks_like_dicom(path)
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
            image = read_dicom(path)
        elif suffix == ".npy":
            image = SourceImage(_read_npy(path), {"format": "npy"})
        elif suffix in (".tif", ".tiff"):
            image = _read_tiff(path)
        elif suffix in PIL_SUFFIXES:
            image = SourceImage(_read_pil(path), {"format": suffix.lstrip(".")})
        else:
            raise PrimisError(f"{path}: unsupported image type '{suffix or path.name}'")
    except PrimisError:
        raise
    except FileNotFoundError:
        raise PrimisError(f"{path}: no such file or folder") from None
    except IsADirectoryError:
        raise PrimisError(f"{path}: is a folder, not an image") from None
    except Exception as err:  # any decoder failure is a bad input, reported in one line
        reason = one_line(err)
        raise PrimisError(f"{path}: cannot read image ({reason})") from None
    return _checked(image, path)


def source_from_array(pixels: np.ndarray, name: str = "image") -> SourceImage:
    """An image given as an array, checked as a decoded file is (colour becomes luminance)."""
    pixels = np.asarray(pixels)
    if pixels.dtype.kind in "uif":
        pixels = gray(pixels)
    return _checked(SourceImage(pixels, {}), Path(name))


def _checked(image: SourceImage, path: Path) -> SourceImage:
    """A decoded image that is 2-D, numeric, finite and within the pixel limit (booleans
    become uint8), or a PrimisError that names ``path``."""
    pixels = image.pixels
    if pixels.ndim != 2:
        raise PrimisError(f"{path}: expected a 2-D grayscale image, got shape {pixels.shape}")
    if pixels.size == 0 or pixels.dtype.kind not in "uifb":
        raise PrimisError(f"{path}: empty or non-numeric image")
    check_size(pixels.size, path)
    if pixels.dtype.kind == "b":
        pixels = pixels.astype(np.uint8)
    if not pixels.dtype.isnative:  # big-endian DICOM, TIFF or .npy: the same values, native
        pixels = pixels.astype(pixels.dtype.newbyteorder("="))
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
    check_size(math.prod(shape[:2] if colour else shape), path)
    return gray(np.load(path, allow_pickle=False))


def read_pixels(path: Path) -> np.ndarray:
    """A 2-D grayscale array with the file's own dtype (colour becomes luminance)."""
    return read_source(path).pixels


def read_image(path: Path) -> tuple[np.ndarray, IntensityMapping]:
    """The image as float32 in [0, 1] and the mapping that restores the file's values."""
    image = read_source(path)
    mapping = image.mapping
    return mapping.forward(image.pixels), mapping


def encode_image(pixels: np.ndarray, suffix: str, photometric: str | None = None) -> bytes:
    """Serialise a 2-D array as PNG (8 or 16 bits unsigned), TIFF or .npy (any numeric dtype);
    a TIFF is MINISWHITE where ``photometric`` (the input's, from the key) says so."""
    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, pixels, allow_pickle=False)
    elif suffix in (".tif", ".tiff"):
        import tifffile

        white = photometric == "MINISWHITE"
        tifffile.imwrite(buffer, pixels, photometric="miniswhite" if white else "minisblack")
    elif pixels.dtype not in (np.uint8, np.uint16):
        raise PrimisError(f"cannot store {pixels.dtype} pixels as {suffix}; use .tif or .npy")
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


OUTPUT_SUFFIXES = (".dcm", ".png", ".tif", ".npy")  # what `disambiguate` may write


def output_suffix(details: dict, dtype: np.dtype) -> str:
    """Where restored pixels go: TIFF and .npy inputs keep their format and type; other 8/16-bit
    unsigned images become PNG (lossless); anything else becomes .npy."""
    kind = details.get("format")
    if kind == "tiff":
        return ".tif"
    if kind == "npy" or np.dtype(dtype) not in (np.uint8, np.uint16):
        return ".npy"
    return ".png"


def list_images(paths: list[Path]) -> list[Path]:
    """Expand files and folders (recursively) into the image files they hold, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file() and is_image_file(p))
        else:
            found.append(path)
    return found
