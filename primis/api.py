"""The Python API: share and restore images, files and folders from code.

Everything the `primis ambiguate` and `primis disambiguate` commands do is here, one call per
image or file; the commands are loops over these functions::

    import primis

    model = primis.load_model("cxr")                 # a bundled model's name or a model directory
    shared = primis.share("chest.png", model=model)  # a path or a 2-D array -> public + key bytes
    image = primis.restore(shared.public, shared.key, model=model)  # the input's dtype and range
    primis.share_file("chest.png", "public", "keys", model=model)   # what `ambiguate` does
    primis.restore_file("public/chest.primis", "keys", "restored", model=model)
    dataset = primis.RestoredDataset("public", "keys", model=model)  # for torch DataLoaders

Every ``model`` argument takes a loaded model (fastest when called repeatedly), a model
directory, a bundled model's name, or None for the default bundled model. Bad input raises
`primis.errors.PrimisError` with a one-line reason.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, Unpack

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from torch.utils.data import Dataset

from primis import sharing
from primis.batch import SharingOutputs, expand, output_folders
from primis.config import REFINE_STEPS, ObfuscationConfig, parse_config
from primis.errors import PrimisError
from primis.formats import KeyFile, read_file
from primis.io.dicom import encode_dicom, is_dicom, original_header
from primis.io.files import write_atomic
from primis.io.images import (
    OUTPUT_SUFFIXES,
    encode_image,
    output_suffix,
    read_image,
    read_source,
    source_from_array,
)
from primis.io.pixels import IntensityMapping
from primis.keywrap import is_wrapped, load_identity, unwrap
from primis.modelstore import LoadedModel, pick_device, save_model
from primis.modelstore import load_model as _load_model
from primis.sharing import SharedImage

ModelLike = LoadedModel | str | os.PathLike | None
ImageLike = np.ndarray | str | os.PathLike
Identity = X25519PrivateKey | str | os.PathLike | None
Names = Literal["auto", "stem", "id"]


def load_model(name_or_dir: str | os.PathLike | None = None, device: str = "auto") -> LoadedModel:
    """A trained model from a run or model directory, or a bundled model's name (None: the
    default bundled model), on ``device`` (auto: CUDA, then MPS, then CPU)."""
    return _load_model(name_or_dir, pick_device(device))


def export_model(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    half: bool = False,
    key_images: list[Path] | None = None,
    key_refine_steps: int = 0,
) -> str:
    """Write a standalone model directory ``out`` from a run or model directory and return its
    hash: weights in float32 (``half``: float16, half the size). With ``key_images``, also a
    key model fitted to the codes the exported weights give those images (at
    ``key_refine_steps``), so that its keys are context coded."""
    model = _load_model(run)
    dtype = torch.float16 if half else torch.float32
    digest = save_model(Path(out), model.network, model.obfuscation, dtype)
    if not key_images:
        return digest
    exported = _load_model(out)
    units = (read_image(Path(path))[0] for path in key_images)
    key_model = sharing.fit_image_keys(exported, units, key_refine_steps)
    return save_model(Path(out), exported.network, exported.obfuscation, dtype, key_model)


def _model(model: ModelLike) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def obfuscation_for(
    model: LoadedModel, obfuscation: ObfuscationConfig | Mapping | None
) -> ObfuscationConfig:
    """The obfuscation a share uses: the model's, or ``obfuscation`` as given, or the model's
    with the settings of a mapping (e.g. ``{"fill": 0.5}``) changed, validated."""
    if isinstance(obfuscation, ObfuscationConfig):
        return obfuscation
    if obfuscation is not None and not isinstance(obfuscation, Mapping):
        raise PrimisError("obfuscation: expected an ObfuscationConfig or a mapping of settings")
    settings = model.obfuscation.model_dump() | dict(obfuscation or {})
    return parse_config(ObfuscationConfig, settings, "obfuscation options")


def share(
    image: ImageLike,
    model: ModelLike = None,
    *,
    k: int | None = None,
    maps: list[int] | None = None,
    refine_steps: int = REFINE_STEPS,
    obfuscation: ObfuscationConfig | Mapping | None = None,
    keep_header: bool = False,
) -> SharedImage:
    """Turn one image into a public file and its private key, as bytes (``.public``,
    ``.key``; also ``.file_id``, ``.ideal_key_bits``, ``.pixels``).

    ``image`` is a file path (any supported format) or a 2-D array of any numeric dtype (colour
    becomes luminance); restoring gives back its size, dtype and range. ``k`` (at most the
    model's) lowers the key size and the quality, ``maps`` issues a key for these code maps
    only, ``refine_steps`` improves the code before sharing (0: the encoder's code, fastest),
    ``obfuscation`` changes the model's obfuscation settings (see `obfuscation_for`), and
    ``keep_header`` puts a DICOM input's original header into the key.
    """
    model = _model(model)
    if isinstance(image, np.ndarray):
        source, header = source_from_array(image), None
    else:
        source = read_source(Path(image))
        dicom = keep_header and source.details.get("format") == "dicom"
        header = base64.b64encode(original_header(Path(image))).decode() if dicom else None
    mapping = source.mapping
    return sharing.share_image(
        mapping.forward(source.pixels),
        mapping,
        model,
        obfuscation_for(model, obfuscation),
        k,
        maps,
        source.details,
        header,
        refine_steps,
    )


@dataclass(frozen=True)
class SharedFile:
    """What `share_file` wrote for one input."""

    input: Path
    file_id: str
    public_path: Path
    key_path: Path
    public_bytes: int
    key_bytes: int
    pixels: int
    ideal_key_bits: float
    seconds: float

    @property
    def key_bits_per_pixel(self) -> float:
        return 8 * self.key_bytes / self.pixels


def named_by_id(path: Path, names: Names) -> bool:
    """Whether an input's outputs are named by its random file id (``names`` "id", or "auto"
    for DICOM, whose file names often hold UIDs) rather than by its stem."""
    return names == "id" or (names == "auto" and is_dicom(Path(path)))


class ShareOptions(TypedDict, total=False):
    """The options of `share`, which `share_file` passes on."""

    k: int | None
    maps: list[int] | None
    refine_steps: int
    obfuscation: ObfuscationConfig | Mapping | None
    keep_header: bool


def share_file(
    path: str | os.PathLike,
    public_dir: str | os.PathLike,
    key_dir: str | os.PathLike,
    model: ModelLike = None,
    *,
    names: Names = "auto",
    overwrite: bool = False,
    outputs: SharingOutputs | None = None,
    **options: Unpack[ShareOptions],
) -> SharedFile | None:
    """What `primis ambiguate` does for one input: write PUBLIC_DIR/NAME.primis and
    KEY_DIR/NAME.primiskey (0600) together, with their manifest lines, where NAME is the
    input's stem or its file id (``names``). Returns None, writing nothing, when the input's
    outputs exist already (``overwrite`` redoes them).

    ``options`` are those of `share`. A batch passes one open ``outputs`` (the
    `SharingOutputs` of these two folders) to every call, so the manifests are read and
    compacted once.
    """
    if outputs is None:
        with SharingOutputs(Path(public_dir), Path(key_dir)) as opened:
            return _share_into(opened, Path(path), model, names, overwrite, options)
    return _share_into(outputs, Path(path), model, names, overwrite, options)


def _share_into(
    outputs: SharingOutputs,
    path: Path,
    model: ModelLike,
    names: Names,
    overwrite: bool,
    options: ShareOptions,
) -> SharedFile | None:
    source, by_id = str(path.absolute()), named_by_id(path, names)
    previous = outputs.previous(source, None if by_id else path.stem)
    if not overwrite and outputs.done(source, previous):
        return None
    started = time.perf_counter()
    shared = share(path, model, **options)
    name = shared.file_id if by_id else path.stem
    record = outputs.write(source, name, shared.file_id, shared.public, shared.key, previous)
    return SharedFile(
        path,
        shared.file_id,
        Path(record["public"]),
        Path(record["key"]),
        len(shared.public),
        len(shared.key),
        shared.pixels,
        shared.ideal_key_bits,
        time.perf_counter() - started,
    )


def _identity(identity: Identity) -> X25519PrivateKey | None:
    if identity is None or isinstance(identity, X25519PrivateKey):
        return identity
    return load_identity(Path(identity))


def _reconstruct(
    public: bytes,
    key: bytes,
    model: ModelLike,
    identity: Identity,
    passphrase: str | None,
    public_name: str = "public file",
    key_name: str = "key",
) -> tuple[np.ndarray, KeyFile]:
    """The authorized reconstruction and the (unwrapped) key that opened it."""
    if is_wrapped(key):
        key = unwrap(key, _identity(identity), passphrase, key_name)
    return sharing.reconstruct(public, key, _model(model), public_name, key_name)


def restore(
    public: bytes,
    key: bytes,
    model: ModelLike = None,
    *,
    identity: Identity = None,
    passphrase: str | None = None,
) -> np.ndarray:
    """The authorized reconstruction of a public file with its key (both as bytes), in the
    input's size, dtype and range. A key wrapped for recipients opens with ``identity`` (a
    private key or its file) or ``passphrase``; a wrong or stale key is refused."""
    return _reconstruct(public, key, model, identity, passphrase)[0]


def restore_file(
    public_path: str | os.PathLike,
    key_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: ModelLike = None,
    *,
    identity: Identity = None,
    passphrase: str | None = None,
    mode: int = 0o600,
    overwrite: bool = False,
) -> Path | None:
    """What `primis disambiguate` does for one public file: restore it with
    KEY_DIR/<stem>.primiskey and write OUT_DIR/<stem>.<type> with permissions ``mode`` (DICOM
    stays DICOM; TIFF and .npy keep their type; other 8/16-bit images become PNG); return its
    path. Returns None, writing nothing, when an output of that stem exists (``overwrite``
    redoes it)."""
    public_path, out_dir = Path(public_path), Path(out_dir)
    if not overwrite and any(
        (out_dir / f"{public_path.stem}{s}").exists() for s in OUTPUT_SUFFIXES
    ):
        return None
    output_folders(out_dir)
    key_path = Path(key_dir) / f"{public_path.stem}.primiskey"
    pixels, key = _reconstruct(
        read_file(public_path),
        read_file(key_path),
        model,
        identity,
        passphrase,
        str(public_path),
        str(key_path),
    )
    details = key.header.source
    if details.get("format") == "dicom":
        target = out_dir / f"{public_path.stem}.dcm"
        header = base64.b64decode(key.header.dicom_header) if key.header.dicom_header else None
        data = encode_dicom(pixels, details, header, key.header.file_id)
    else:
        target = out_dir / f"{public_path.stem}{output_suffix(details, pixels.dtype)}"
        data = encode_image(pixels, target.suffix)
    write_atomic(target, data, mode)
    return target


def attacker_view(public: bytes, model: ModelLike = None) -> np.ndarray:
    """What anyone decodes from a public file alone (no key): a float32 image in [0, 1] of the
    code grid's padded size (only the key holds the exact size)."""
    return sharing.attacker_view(public, _model(model))


def attacker_view_file(
    public_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: ModelLike = None,
    *,
    overwrite: bool = False,
) -> Path | None:
    """What `primis disambiguate --without-key` does for one public file: write the attacker's
    view as OUT_DIR/<stem>.png and return its path (None when it exists and not
    ``overwrite``)."""
    public_path = Path(public_path)
    target = Path(out_dir) / f"{public_path.stem}.png"
    if not overwrite and target.exists():
        return None
    output_folders(Path(out_dir))
    view = sharing.attacker_view(read_file(public_path), _model(model), str(public_path))
    write_atomic(target, encode_image(np.rint(view * 255).astype(np.uint8), ".png"))
    return target


class RestoredDataset(Dataset):
    """Authorized reconstructions of a folder of public files, for training downstream models
    on shared data: item ``i`` is the image of ``paths[i]`` (public files found recursively,
    sorted) restored with KEY_DIR/<stem>.primiskey, as a float32 tensor (1, H, W) in [0, 1]
    of the input's intensity range, passed through ``transform`` when given.

    Images are restored when asked for (nothing is cached), on the model's device; wrapped
    keys open with ``identity`` or ``passphrase`` as in `restore`.
    """

    def __init__(
        self,
        public_dir: str | os.PathLike,
        key_dir: str | os.PathLike,
        model: ModelLike = None,
        *,
        identity: Identity = None,
        passphrase: str | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        public_dir, self.key_dir = Path(public_dir), Path(key_dir)
        if not public_dir.is_dir():
            raise PrimisError(f"{public_dir}: no such folder of public files")
        self.paths = expand([public_dir], lambda p: p.suffix == ".primis")
        if not self.paths:
            raise PrimisError(f"{public_dir}: no public files (.primis)")
        missing = [p for p in self.paths if not self._key_path(p).is_file()]
        if missing:
            raise PrimisError(
                f"{self.key_dir}: no key for {len(missing)} of {len(self.paths)} public files, "
                f"e.g. {missing[0].name}"
            )
        self.model = _model(model)
        self.identity, self.passphrase = _identity(identity), passphrase
        self.transform = transform

    def _key_path(self, public_path: Path) -> Path:
        return self.key_dir / f"{public_path.stem}.primiskey"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        key_path = self._key_path(path)
        pixels, key = _reconstruct(
            read_file(path),
            read_file(key_path),
            self.model,
            self.identity,
            self.passphrase,
            str(path),
            str(key_path),
        )
        unit = IntensityMapping.from_dict(key.header.intensity).forward(pixels)
        image = torch.from_numpy(unit)[None]
        return self.transform(image) if self.transform else image


__all__ = [
    "RestoredDataset",
    "ShareOptions",
    "SharedFile",
    "SharedImage",
    "attacker_view",
    "attacker_view_file",
    "load_model",
    "named_by_id",
    "obfuscation_for",
    "restore",
    "restore_file",
    "share",
    "share_file",
]
