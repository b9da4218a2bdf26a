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
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypedDict, Unpack

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from torch.utils.data import Dataset

from primis import formats, sharing
from primis.batch import Outcome, SharingOutputs, StagedPair, expand, output_folders, stage_pair
from primis.config import REFINE_STEPS, ModelConfig, ObfuscationConfig, parse_config
from primis.errors import PrimisError, PrivacyWarning
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
from primis.keywrap import KeyWrapping, is_wrapped, load_identity, unwrap
from primis.modelstore import LoadedModel, pick_device, save_model
from primis.modelstore import load_model as _load_model
from primis.obfuscation import check_mode_for_rate
from primis.privacy import PRIVACY_MODES, privacy_warning
from primis.sharing import RateControl, SharedImage, ShareFigures

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
    key_couplings: bool = True,
    base: str | None = None,
    residual_psnr: float | None = None,
) -> str:
    """Write a standalone model directory ``out`` from a run or model directory and return its
    hash: weights in float32 (``half``: float16, half the size). With ``key_images``, also a
    key model fitted to the codes the exported weights give those images (at
    ``key_refine_steps``; ``key_couplings``: with couplings, smaller keys coded in somewhat
    more time, `primis.keys.couplings`), so that its keys are context coded. With ``base`` (a
    bundled model's name) the directory holds only the tensors that differ from the base's
    (for bundled models that share a part); it loads only where that base is bundled. With
    ``residual_psnr`` the model's keys also carry a high-fidelity layer up to that PSNR in dB
    (`primis.fidelity`; the bundled ``cxr-hq`` is ``cxr`` so exported)."""
    model = _load_model(run)
    if residual_psnr is not None:
        update = model.network.config.model_dump() | {"residual_psnr": residual_psnr}
        model.network.config = parse_config(ModelConfig, update, "residual_psnr")
    dtype = torch.float16 if half else torch.float32
    if not key_images:
        return save_model(Path(out), model.network, model.obfuscation, dtype, model.key_model, base)
    save_model(Path(out), model.network, model.obfuscation, dtype)  # the weights keys will use
    exported = _load_model(out)
    units = (read_image(Path(path))[0] for path in key_images)
    key_model = sharing.fit_image_keys(exported, units, key_refine_steps, key_couplings)
    return save_model(Path(out), exported.network, exported.obfuscation, dtype, key_model, base)


def _model(model: ModelLike) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def obfuscation_for(
    model: LoadedModel,
    obfuscation: ObfuscationConfig | Mapping | None,
    privacy: str | None = None,
    *,
    stacklevel: int = 2,
) -> ObfuscationConfig:
    """The obfuscation a share uses: the model's (or the named ``privacy`` mode's, see
    `privacy.PRIVACY_MODES`), or ``obfuscation`` as given, or those settings with the
    ones of a mapping (e.g. ``{"fill": 0.5}``) changed, validated (an adaptive-rate model
    shares only in the strict mode). A mode that is not private warns what it leaks
    (`PrivacyWarning`, pointing ``stacklevel`` frames up as `warnings.warn` does)."""
    if privacy is not None and privacy not in PRIVACY_MODES:
        raise PrimisError(f"privacy {privacy!r}: expected one of {', '.join(PRIVACY_MODES)}")
    if isinstance(obfuscation, ObfuscationConfig):
        if privacy is not None:
            raise PrimisError("give a privacy preset or an ObfuscationConfig, not both")
        chosen = obfuscation
    elif obfuscation is not None and not isinstance(obfuscation, Mapping):
        raise PrimisError("obfuscation: expected an ObfuscationConfig or a mapping of settings")
    else:
        base = PRIVACY_MODES[privacy].settings if privacy else model.obfuscation
        settings = base.model_dump() | dict(obfuscation or {})
        chosen = parse_config(ObfuscationConfig, settings, "obfuscation options")
    check_mode_for_rate(chosen, model.network.config.adaptive_rate)
    leak = privacy_warning(chosen)
    if leak:
        warnings.warn(leak, PrivacyWarning, stacklevel=stacklevel)
    return chosen


class ShareOptions(TypedDict, total=False):
    """The options of `share`, which `share_file` and the batches pass on."""

    k: int | None
    maps: list[int] | None
    refine_steps: int
    obfuscation: ObfuscationConfig | Mapping | None
    privacy: str | None
    keep_header: bool
    rate_weight: float | None
    key_bpp: float | None
    quality: float | None


@dataclass(frozen=True)
class ShareSettings:
    """`ShareOptions` resolved for a model (`share_settings`), once per call: what each file of
    a share, a batch or a DICOM node is shared with."""

    obfuscation: ObfuscationConfig
    rate: RateControl
    k: int | None = None
    maps: list[int] | None = None
    refine_steps: int = REFINE_STEPS
    keep_header: bool = False


def share_settings(
    model: LoadedModel, options: ShareOptions, *, stacklevel: int = 2
) -> ShareSettings:
    """``options`` resolved for ``model``: the obfuscation of `obfuscation_for` (which warns
    what a mode that is not private leaks, once, ``stacklevel`` frames up) and the rate control
    checked, before any file is read."""
    obfuscation = obfuscation_for(
        model, options.get("obfuscation"), options.get("privacy"), stacklevel=stacklevel + 1
    )
    return ShareSettings(
        obfuscation,
        RateControl(options.get("rate_weight"), options.get("key_bpp"), options.get("quality")),
        options.get("k"),
        options.get("maps"),
        options.get("refine_steps", REFINE_STEPS),
        options.get("keep_header", False),
    )


def share(
    image: ImageLike,
    model: ModelLike = None,
    *,
    k: int | None = None,
    maps: list[int] | None = None,
    refine_steps: int = REFINE_STEPS,
    obfuscation: ObfuscationConfig | Mapping | None = None,
    privacy: str | None = None,
    keep_header: bool = False,
    rate_weight: float | None = None,
    key_bpp: float | None = None,
    quality: float | None = None,
) -> SharedImage:
    """Turn one image into a public file and its private key, as bytes (``.public``,
    ``.key``; also ``.file_id``, ``.ideal_key_bits``, ``.pixels``, ``.key_bits_per_pixel``,
    ``.rate_weight`` and, with a target, ``.psnr``).

    ``image`` is a file path (any supported format) or a 2-D array of any numeric dtype (colour
    becomes luminance); restoring gives back its size, dtype and range. ``k`` (at most the
    model's) lowers the key size and the quality, ``maps`` issues a key for these code maps
    only, ``refine_steps`` improves the code before sharing (0: the encoder's code, fastest),
    ``obfuscation`` changes the model's obfuscation settings (see `obfuscation_for`),
    ``privacy`` starts from a named preset instead ("strict": the public file is independent
    of the image, the only private mode; "compact": half the noise, a smaller key, and the
    public file links to its image; "paper": public signs, as small a key, linkable and the
    image leaks; see docs/privacy.md; both files record the preset, or "custom"; every
    mode but strict warns what it leaks with `PrivacyWarning`), and
    ``keep_header`` puts a DICOM input's original header into the key. The
    key's size: ``rate_weight`` trades quality for key bits in the choice of code (default:
    `sharing.RATE_WEIGHT` when refining, 0 without),
    or rate control picks it per image to keep the key within ``key_bpp`` bits per pixel or
    the restored image at ``quality`` dB PSNR or better (see `sharing.RateControl`).
    """
    model = _model(model)
    options = ShareOptions(
        k=k,
        maps=maps,
        refine_steps=refine_steps,
        obfuscation=obfuscation,
        privacy=privacy,
        keep_header=keep_header,
        rate_weight=rate_weight,
        key_bpp=key_bpp,
        quality=quality,
    )
    return _share(image, model, share_settings(model, options, stacklevel=3))


def _share(image: ImageLike, model: LoadedModel, settings: ShareSettings) -> SharedImage:
    """`share` with settings resolved (and warned about) by the caller."""
    if isinstance(image, np.ndarray):
        source, header = source_from_array(image), None
    else:
        source = read_source(Path(image))
        dicom = settings.keep_header and source.details.get("format") == "dicom"
        header = base64.b64encode(original_header(Path(image))).decode() if dicom else None
    mapping, details = source.mapping, source.details
    unit = mapping.forward(source.pixels)
    del source  # the input's own pixels: not needed again, and as large as the image
    return sharing.share_image(
        unit,
        mapping,
        model,
        settings.obfuscation,
        settings.k,
        settings.maps,
        details,
        header,
        settings.refine_steps,
        rate=settings.rate,
    )


@dataclass(frozen=True, kw_only=True)
class SharedFile(ShareFigures):
    """What `share_file` wrote for one input: the figures of its `SharedImage` without the
    bytes (it travels back from a batch's workers, and keeps the key out of clear), the input,
    where its public file and key went and the seconds it took."""

    input: Path
    public_path: Path
    key_path: Path
    seconds: float

    def summary(self) -> str:
        """The one-line report `primis ambiguate` prints for this file."""
        quality = "" if self.psnr is None else f", restored {self.psnr:.2f} dB"
        return (
            f"{self.input.name}: public {self.public_bytes} B, key {self.key_bytes} B "
            f"({self.key_bits_per_pixel:.3f} bpp; "
            f"ideal support {self.ideal_key_bits / 8:.0f} B; rate weight {self.rate_weight:g}"
            f"{quality}) in {self.seconds:.2f} s"
        )


def named_by_id(path: Path, names: Names) -> bool:
    """Whether an input's outputs are named by its random file id (``names`` "id", the
    default: a file name often holds a patient's name, an accession number or a UID; or "auto"
    for DICOM only, the former default) rather than by its stem ("stem")."""
    return names == "id" or (names == "auto" and is_dicom(Path(path)))


def share_file(
    path: str | os.PathLike,
    public_dir: str | os.PathLike,
    key_dir: str | os.PathLike,
    model: ModelLike = None,
    *,
    names: Names = "id",
    overwrite: bool = False,
    outputs: SharingOutputs | None = None,
    source: str | None = None,
    recipients: Sequence[X25519PublicKey | str | os.PathLike] = (),
    passphrase: str | None = None,
    **options: Unpack[ShareOptions],
) -> SharedFile | None:
    """What `primis ambiguate` does for one input: write PUBLIC_DIR/NAME.primis and
    KEY_DIR/NAME.primiskey (0600) together, with their manifest lines, where NAME is its
    random file id (``names`` "id", the default) or the input's stem ("stem"). Returns None,
    writing nothing, when the input's outputs exist already (``overwrite`` redoes them).

    ``options`` are those of `share`. A batch passes one open ``outputs`` (the
    `SharingOutputs` of these two folders) to every call, so the manifests are read and
    compacted once. ``source`` names the input in the private manifest (default: its absolute
    path), e.g. the SOP Instance UID of an instance received over the network, whose file is
    temporary.

    ``recipients`` (X25519 public keys or NAME.pub files) and/or ``passphrase`` write the key
    wrapped for them (`primis.keywrap`), never in clear on disk; with ``outputs``, give them
    to `SharingOutputs` (``wrapping``) instead.
    """
    if outputs is not None and (recipients or passphrase):
        raise PrimisError("with outputs=, give the key wrapping to SharingOutputs(wrapping=)")
    model = _model(model)
    settings = share_settings(model, options, stacklevel=3)
    if outputs is None:
        wrapping = KeyWrapping(recipients, passphrase) if recipients or passphrase else None
        with SharingOutputs(Path(public_dir), Path(key_dir), wrapping) as opened:
            return share_into(opened, path, model, settings, names, overwrite, source)
    return share_into(outputs, path, model, settings, names, overwrite, source)


@dataclass(frozen=True)
class FileSharer:
    """`share_into` fixed folders with fixed settings, as a callable that pickles, so that
    a batch can run it in worker processes (`primis.batch.run_batch` with ``workers``): each
    process loads the model (``model``: a run directory or bundled name, on ``device``) and
    opens the output folders once, on its first file."""

    model: str
    device: str
    public_dir: Path
    key_dir: Path
    settings: ShareSettings
    names: Names = "id"
    overwrite: bool = False
    wrapping: KeyWrapping | None = None  # keys written wrapped (`SharingOutputs`)

    def reuse(self, model: LoadedModel, outputs: SharingOutputs) -> FileSharer:
        """Give this process's loaded model and open outputs to the sharer (no second load)."""
        _OPENED[self._opened] = model, outputs
        return self

    @property
    def _opened(self) -> tuple:
        return self.model, self.device, self.public_dir, self.key_dir

    def report(self, path: Path) -> str:
        """One file of `ambiguate`: its report line, or `batch.Outcome.SKIPPED` when its outputs
        exist."""
        done = self(path)
        return Outcome.SKIPPED if done is None else done.summary()

    def __call__(self, path: Path) -> SharedFile | None:
        if self._opened not in _OPENED:  # once per process
            model = load_model(self.model, self.device)
            outputs = SharingOutputs(self.public_dir, self.key_dir, self.wrapping)
            _OPENED[self._opened] = model, outputs
        model, outputs = _OPENED[self._opened]
        return share_into(outputs, path, model, self.settings, self.names, self.overwrite)


_OPENED: dict[tuple, tuple[LoadedModel, SharingOutputs]] = {}  # FileSharer's, per process


def share_into(
    outputs: SharingOutputs,
    path: str | os.PathLike,
    model: LoadedModel,
    settings: ShareSettings,
    names: Names = "id",
    overwrite: bool = False,
    source: str | None = None,
) -> SharedFile | None:
    """`share_file` into open ``outputs`` with settings the caller resolved once
    (`share_settings`): the work of one file of a batch or a DICOM node, which warns of
    nothing."""
    path = Path(path)
    source = source or str(path.absolute())
    previous = outputs.previous(source, output_stem(path, names))
    if not overwrite and outputs.done(source, previous):
        return None
    staged, shared = stage_share(
        path, outputs.public_dir, outputs.key_dir, model, names, source, settings, outputs.wrapping
    )
    outputs.commit(staged, previous)
    return shared


def output_stem(path: Path, names: Names) -> str | None:
    """The stem an input's outputs take, or None where they are named by file id."""
    return None if named_by_id(path, names) else path.stem


def stage_share(
    path: Path,
    public_dir: Path,
    key_dir: Path,
    model: LoadedModel,
    names: Names,
    source: str,
    settings: ShareSettings,
    wrapping: KeyWrapping | None = None,
) -> tuple[StagedPair, SharedFile]:
    """Share one input with resolved ``settings`` and stage its pair in the output folders
    (`batch.stage_pair`, the key wrapped with ``wrapping``): the work of one file of
    `ambiguate`, wherever it runs; `SharingOutputs.commit` then places it."""
    started = time.perf_counter()
    shared = _share(path, model, settings)
    name = output_stem(path, names) or shared.file_id
    staged = stage_pair(
        public_dir, key_dir, source, name, shared.file_id, shared.public, shared.key, wrapping
    )
    done = SharedFile(
        **shared.figures(),
        input=path,
        public_path=Path(staged.record["public"]),
        key_path=Path(staged.record["key"]),
        seconds=time.perf_counter() - started,
    )
    return staged, done


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
    suffix, data = _restored_file(public_path, key_dir, model, identity, passphrase, False)
    target = out_dir / f"{public_path.stem}{suffix}"
    write_atomic(target, data, mode)
    return target


def restore_dicom(
    public_path: str | os.PathLike,
    key_dir: str | os.PathLike,
    model: ModelLike = None,
    *,
    identity: Identity = None,
    passphrase: str | None = None,
) -> bytes:
    """The authorized reconstruction of a public file (restored with
    KEY_DIR/<stem>.primiskey) as the bytes of a DICOM file, kept in memory: what `primis
    restore-to` sends to a DICOM node. Its header is the original one where the key holds it
    (``ambiguate --keep-header``), otherwise a new de-identified one; an input that was not
    DICOM becomes a Secondary Capture image."""
    return _restored_file(Path(public_path), key_dir, model, identity, passphrase, True)[1]


def _restored_file(
    public_path: Path,
    key_dir: str | os.PathLike,
    model: ModelLike,
    identity: Identity,
    passphrase: str | None,
    as_dicom: bool,
) -> tuple[str, bytes]:
    """The authorized reconstruction of a public file as a file's suffix and bytes: DICOM for
    a DICOM input (or any input, ``as_dicom``), otherwise its own type (see `restore_file`)."""
    key_path = formats.key_beside(public_path, Path(key_dir))
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
    if as_dicom or details.get("format") == "dicom":
        header = base64.b64decode(key.header.dicom_header) if key.header.dicom_header else None
        return ".dcm", encode_dicom(pixels, details, header, key.header.file_id)
    suffix = output_suffix(details, pixels.dtype)
    return suffix, encode_image(pixels, suffix, details.get("photometric"))


def restore_report(
    path: Path,
    key_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    model: ModelLike,
    *,
    identity: Identity = None,
    passphrase: str | None = None,
    mode: int = 0o600,
    overwrite: bool = False,
    without_key: bool = False,
) -> str:
    """One file of `primis disambiguate`, wherever it runs: `restore_file` (or, ``without_key``,
    `attacker_view_file`), as its report line or `batch.Outcome.SKIPPED` when its output exists."""
    if without_key:
        target = attacker_view_file(path, out_dir, model, overwrite=overwrite)
        return Outcome.SKIPPED if target is None else f"{path.name} -> {target} (attacker's view)"
    if key_dir is None:
        raise PrimisError("a key folder is required (or without_key for the attacker's view)")
    target = restore_file(
        path,
        key_dir,
        out_dir,
        model,
        identity=identity,
        passphrase=passphrase,
        mode=mode,
        overwrite=overwrite,
    )
    return Outcome.SKIPPED if target is None else f"{path.name} -> {target}"


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
        self.paths = expand([public_dir], formats.is_public_file)
        if not self.paths:
            raise PrimisError(f"{public_dir}: no public files ({formats.PUBLIC_SUFFIX})")
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
        return formats.key_beside(public_path, self.key_dir)

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
    "ShareSettings",
    "SharedFile",
    "SharedImage",
    "attacker_view",
    "attacker_view_file",
    "load_model",
    "named_by_id",
    "obfuscation_for",
    "restore",
    "restore_file",
    "restore_report",
    "share",
    "share_file",
    "share_into",
    "share_settings",
    "stage_share",
]
