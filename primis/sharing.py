"""The inference pipeline: image -> (public file, key file) and back, and the attacker's view.

    pixels --mapping--> [0,1] --pad--> encode, refine --> ternary code (m*h*w vectors, length n)
      --ambiguate--> public vectors  ==> public file (no image data beyond the code)
      --supports-->  packed key      ==> key file (file id, public digest, mapping, shape)

Disambiguation reverses it; keys may open a subset of the code maps (the others decode as
zeros), and the attacker's view decodes the public vectors as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from itertools import pairwise

import numpy as np
import torch

from primis.config import REFINE_STEPS, ObfuscationConfig
from primis.errors import PrimisError
from primis.formats import (
    UNSEALED,
    KeyFile,
    KeyHeader,
    PublicFile,
    PublicHeader,
    new_file_id,
    open_pair,
    seal_pair,
)
from primis.io.pixels import IntensityMapping, pad_to_multiple
from primis.keys import (
    KeyCoder,
    KeyModel,
    KeySpec,
    coder_for,
    decode_key,
    encode_key,
    fit_key_model,
    key_spec,
)
from primis.limits import MAX_PIXELS, release_free_memory
from primis.model import SparseTernaryAutoEncoder, choose_code, refine_scores
from primis.modelstore import LoadedModel, bundled_model_with_hash
from primis.obfuscation import (
    ambiguate_maps,
    check_mode_for_rate,
    code_to_vectors,
    crop_grid,
    image_grid,
    noise_count,
    pad_public,
    vectors_to_code,
)
from primis.privacy import privacy_preset_name


@dataclass(frozen=True)
class Tiling:
    """How images larger than one tile are encoded and decoded: in tiles of ``cells`` x ``cells``
    code positions, each computed with ``halo`` positions of context on every side and only its
    inner part kept. Peak memory then follows the tile, not the image, and time grows linearly
    with the pixel count.

    The bundled model's encoder sees 6 code positions to each side and its decoder 10, so with a
    halo of 10 a tiled code, its refinement and its tiled decoding equal the whole image's (up
    to rounding; `benchmarks/tiling.py` measures it). An image whose grid fits in
    ``cells + 2 * halo`` positions each way is processed whole. Refinement keeps the scores of a
    whole ``region`` x ``region`` positions in memory (m * n floats per position, with the
    optimiser's state); larger images are refined region by region, with the same halo.
    """

    cells: int = 64
    halo: int = 10
    region: int = 192

    def __post_init__(self) -> None:
        if self.cells < 1 or self.halo < 0 or self.region < self.cells:
            raise PrimisError(
                "tiles need 1 or more code positions, a halo of 0 or more and a"
                " region of at least one tile"
            )

    def fits(self, shape: tuple[int, ...], multiple: int) -> bool:
        """Whether an image of padded ``shape`` goes whole."""
        return max(shape) // multiple <= self.cells + 2 * self.halo

    def tiles(self, grid: tuple[int, int]) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
        """(outer, inner) code-position slices covering ``grid``; inner parts do not overlap and
        are of equal size (within one position) of at most ``cells``, so no thin tile pays a
        whole halo."""
        spans = []
        for size in grid:
            count = -(-size // self.cells)
            bounds = [round(i * size / count) for i in range(count + 1)]
            spans.append(
                [
                    (slice(max(0, a - self.halo), min(size, b + self.halo)), slice(a, b))
                    for a, b in pairwise(bounds)
                ]
            )
        return [((rows[0], cols[0]), (rows[1], cols[1])) for rows in spans[0] for cols in spans[1]]

    @staticmethod
    def within(outer: tuple[slice, slice], inner: tuple[slice, slice]) -> tuple[slice, slice]:
        """``inner`` counted from the start of ``outer``."""
        return tuple(
            slice(i.start - o.start, i.stop - o.start) for o, i in zip(outer, inner, strict=True)
        )


BATCH_SIZE = 16  # images of one size encoded or decoded in one forward pass, at most
MIN_KEY_BITS = 128  # a key's information (coded size) below this could be guessed
# Rate-distortion optimised coding (`model.choose_code`): the default weight of a key bit when
# refining, chosen on validation images (MODEL_CARD.md), and the weights rate control searches.
RATE_WEIGHT = 0.05
RATE_WEIGHTS = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4)


@dataclass(frozen=True)
class RateControl:
    """How much key each image gets.

    ``weight`` (score units per key bit, >= 0) makes the choice of code rate-distortion
    optimised: 0 gives the lowest distortion, larger weights smaller keys for some quality;
    None means `RATE_WEIGHT` when refining and 0 without refinement (the rest of the code cannot
    adapt then, so a weight costs more quality per bit saved) or without a key model (weights
    and targets need one: it prices each atom). ``key_bpp`` (key bits per pixel,
    at most) or ``quality`` (PSNR of the restored image over its own range, in dB, at least)
    instead searches `RATE_WEIGHTS` per image: the best quality within the key budget, or the
    smallest key at the quality; each weight tried costs one more encoding.
    """

    weight: float | None = None
    key_bpp: float | None = None
    quality: float | None = None

    def __post_init__(self) -> None:
        for name in ("weight", "key_bpp", "quality"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise PrimisError(f"{name.replace('_', ' ')} {value}: expected a number >= 0")
        if self.key_bpp is not None and self.quality is not None:
            raise PrimisError("give a key size or a quality to aim at, not both")
        if self.weight is not None and self.targeted:
            raise PrimisError("a rate weight and a target exclude each other (the target sets it)")

    @property
    def targeted(self) -> bool:
        return self.key_bpp is not None or self.quality is not None

    def weight_for(self, refine_steps: int, model: LoadedModel) -> float:
        """The weight to use without a target (the default needs a model with a key model)."""
        if self.weight is not None:
            return self.weight
        return RATE_WEIGHT if refine_steps and model.key_model is not None else 0.0

    def met_by(self, shared: SharedImage) -> bool:
        """Whether a shared image meets the target."""
        if self.key_bpp is not None:
            return shared.key_bits_per_pixel <= self.key_bpp
        return shared.psnr is not None and shared.psnr >= self.quality


@dataclass(frozen=True, kw_only=True)
class ShareFigures:
    """One shared image in figures: the file id its public file and key carry, their sizes in
    bytes, the key's ideal support size in bits, the image's pixel count, the rate weight its
    code was chosen with and, under rate control, the PSNR (dB) its restoration reaches."""

    file_id: str
    public_bytes: int
    key_bytes: int
    ideal_key_bits: float
    pixels: int
    rate_weight: float = 0.0
    psnr: float | None = None

    @property
    def key_bits_per_pixel(self) -> float:
        return 8 * self.key_bytes / self.pixels

    def figures(self) -> dict:
        """The fields of `ShareFigures` alone, e.g. to build a `primis.api.SharedFile`."""
        return {f.name: getattr(self, f.name) for f in fields(ShareFigures)}


@dataclass(frozen=True, kw_only=True)
class SharedImage(ShareFigures):
    """One shared image: its public file and key (bytes), with their figures (the sizes are
    those of ``public`` and ``key``)."""

    public: bytes
    key: bytes
    public_bytes: int = field(init=False)
    key_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_bytes", len(self.public))
        object.__setattr__(self, "key_bytes", len(self.key))


@dataclass(frozen=True)
class ImageToShare:
    """An input in model range with what its key must carry to restore it."""

    unit: np.ndarray
    mapping: IntensityMapping
    source: dict = field(default_factory=dict)
    dicom_header: str | None = None


def share_images(
    images: list[ImageToShare],
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int | None = None,
    maps: list[int] | None = None,
    batch_size: int = BATCH_SIZE,
    refine_steps: int = REFINE_STEPS,
    progress: Callable[[int, int], None] | None = None,
    rate: RateControl | None = None,
) -> list[SharedImage]:
    """Encode (see `encode_images`, which reports ``progress``) and ambiguate images, with the
    key sizes ``rate`` asks for (default `RateControl()`).

    Each key opens ``maps`` (default all); ``source`` and ``dicom_header`` go into the key only.
    """
    rate = rate or RateControl()
    cfg = model.network.config
    k = k or cfg.k
    maps = sorted(set(maps)) if maps else list(range(cfg.m))
    if any(not 0 <= j < cfg.m for j in maps):
        raise PrimisError(f"maps must lie in 0..{cfg.m - 1}")
    if not 1 <= k <= cfg.k:
        raise PrimisError(f"k must lie in 1..{cfg.k} for this model")
    if cfg.adaptive_rate:
        _check_adaptive_sharing(model, obfuscation)
    if rate.targeted:
        return [
            _rate_controlled(image, model, obfuscation, k, maps, refine_steps, rate, progress)
            for image in images
        ]
    units = [image.unit for image in images]
    weight = rate.weight_for(refine_steps, model)
    codes = encode_images(
        model, units, k, refine_steps, batch_size, progress=progress, rate_weight=weight
    )
    return [
        _package(image, code, model, obfuscation, k, maps, weight)
        for image, code in zip(images, codes, strict=True)
    ]


def _check_adaptive_sharing(model: LoadedModel, obfuscation: ObfuscationConfig) -> None:
    """An adaptive-rate model's vectors hold varying counts: they share only where the public
    vectors reveal nothing, under a key model that codes each count (a context-coded key with
    ``variable_rate``); otherwise PrimisError."""
    check_mode_for_rate(obfuscation, adaptive_rate=True)
    if model.key_model is None:
        raise PrimisError(
            "an adaptive-rate model's keys code each vector's count under a key model, and this"
            " model has none (primis export --key-data)"
        )


def _rate_controlled(
    image: ImageToShare,
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int,
    maps: list[int],
    refine_steps: int,
    rate: RateControl,
    progress: Callable[[int, int], None] | None,
) -> SharedImage:
    """The image shared with the weight of `RATE_WEIGHTS` that meets ``rate``'s target best:
    for a key budget the smallest weight within it (else the largest), for a quality the
    largest weight that reaches it (else 0). Bisection: quality falls and keys shrink as the
    weight grows."""
    from primis.metrics import psnr  # scikit-image: loaded only where needed

    if model.key_model is None:
        raise PrimisError("rate control needs a model with a key model (primis export --key-data)")
    tried: dict[int, SharedImage] = {}

    def attempt(index: int) -> SharedImage:
        if index not in tried:
            weight = RATE_WEIGHTS[index]
            code = encode_images(
                model, [image.unit], k, refine_steps, progress=progress, rate_weight=weight
            )[0]
            decoded = decode_codes(model, [code])[0]  # what the key restores, decoded once
            shared = _package(image, code, model, obfuscation, k, maps, weight, decoded)
            _, key = read_pair(shared.public, shared.key)
            restored = image.mapping.forward(_restore(decoded, key)[0])
            tried[index] = replace(shared, psnr=psnr(image.unit, restored))
        return tried[index]

    # met_by is monotone in the weight: False...True for a key budget, True...False for a
    # quality; bisection finds the boundary.
    budget = rate.key_bpp is not None
    low, high = 0, len(RATE_WEIGHTS) - 1
    while low < high:
        if budget:
            middle = (low + high) // 2
            low, high = (low, middle) if rate.met_by(attempt(middle)) else (middle + 1, high)
        else:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if rate.met_by(attempt(middle)) else (low, middle - 1)
    return attempt(low)


def encode_images(
    model: LoadedModel,
    units: list[np.ndarray],
    k: int,
    refine_steps: int = REFINE_STEPS,
    batch_size: int = BATCH_SIZE,
    tiling: Tiling | None = None,
    progress: Callable[[int, int], None] | None = None,
    rate_weight: float = 0.0,
) -> list[torch.Tensor]:
    """Ternary code (1,m,n,h,w) of each image in [0,1], padded to the model's grid; images of
    one padded size share a forward pass, and images larger than one tile go tile by tile (see
    `Tiling`). With ``refine_steps`` each code is refined on the image's own pixels (the
    padding does not count), and ``progress(done, total)`` hears of each refinement step. A
    ``rate_weight`` > 0 (score units per key bit, for a model with a key model) makes the
    choice of code rate-distortion optimised (`model.choose_code`): smaller keys for a little
    quality."""
    tiling = tiling or Tiling()
    rate = _rate_bias(model, rate_weight)
    multiple = model.network.config.downsampling
    shapes = [tuple(-(-size // multiple) * multiple for size in unit.shape) for unit in units]
    whole = [i for i, shape in enumerate(shapes) if tiling.fits(shape, multiple)]
    groups = _batches([shapes[i] for i in whole], batch_size)
    batches = [[whole[i] for i in group] for group in groups]
    regions = {
        i: Tiling(tiling.region, tiling.halo, tiling.region).tiles(_grid(shapes[i], multiple))
        for i in sorted(set(range(len(units))) - set(whole))
    }
    passes = len(batches) + sum(len(parts) for parts in regions.values())  # refinements
    on_step = _step_counter(progress, refine_steps * passes)
    run = _Encoding(model.network, _device(model), k, refine_steps, tiling, on_step, rate)
    codes: dict[int, torch.Tensor] = {}
    for indices in batches:
        codes.update(zip(indices, _encode_batch(run, [units[i] for i in indices]), strict=True))
    for i, parts in regions.items():
        codes[i] = _encode_large(run, units[i], _grid(shapes[i], multiple), parts)
    return [codes[i] for i in range(len(units))]


@dataclass(frozen=True)
class _Encoding:
    """What the forward passes of one `encode_images` call share."""

    network: SparseTernaryAutoEncoder
    device: torch.device
    k: int
    refine_steps: int
    tiling: Tiling
    on_step: Callable[[], None] | None
    rate: Callable[[torch.Tensor], torch.Tensor] | None

    @property
    def multiple(self) -> int:
        return self.network.config.downsampling

    def encode(self, pixels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
        """Codes of padded images (B, H, W) of one size, whose own pixels ``valid`` marks."""
        x, mask = (torch.from_numpy(a)[:, None].to(self.device) for a in (pixels, valid))
        return self.network.encode(x, self.k, self.refine_steps, mask, self.on_step, self.rate)


def _encode_batch(run: _Encoding, units: list[np.ndarray]) -> list[torch.Tensor]:
    """The codes of images of one padded size, in one forward pass."""
    padded = [pad_to_multiple(unit, run.multiple) for unit in units]
    everything = (slice(0, padded[0].shape[0]), slice(0, padded[0].shape[1]))
    valid = [_valid_mask(unit.shape, everything) for unit in units]
    code = run.encode(np.stack(padded), np.stack(valid))
    return [code[row : row + 1] for row in range(len(units))]


def _encode_large(
    run: _Encoding,
    unit: np.ndarray,
    grid: tuple[int, int],
    regions: list[tuple[tuple[slice, slice], tuple[slice, slice]]],
) -> torch.Tensor:
    """The code of an image larger than one tile, region by region (`_encode_region`; the
    padded image is never made whole)."""
    cfg = run.network.config
    code = torch.zeros((1, cfg.m, cfg.n, *grid), dtype=torch.int8)
    for outer, inner in regions:
        pixels = _scaled(outer, run.multiple)
        part = _encode_region(
            run,
            _padded_region(unit, pixels),
            _valid_mask(unit.shape, pixels, np.bool_),  # a quarter of float32's memory
        )
        code[..., inner[0], inner[1]] = part[..., *run.tiling.within(outer, inner)]
    return code


def _rate_bias(model: LoadedModel, weight: float) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For rate-distortion optimised coding (`model.choose_code`): a function from codes
    (B,m,n,h,w) to the bias (2,B,m,n,h,w), float16, of ``weight`` times each atom's key bits
    under the model's key model (`KeyCoder.atom_costs`); None for weight 0."""
    if not weight:
        return None
    if weight < 0 or not math.isfinite(weight):
        raise PrimisError(f"rate weight {weight}: expected a finite number >= 0")
    if model.key_model is None:
        raise PrimisError("a rate weight needs a model with a key model (primis export --key-data)")

    def bias(codes: torch.Tensor) -> torch.Tensor:
        _, m, n, rows, cols = codes.shape
        per_image = []
        # Half precision (a bias of about 0..1 needs no more), viewed, not copied: a large
        # image's bias would otherwise take twice the memory of its scores.
        for code in codes:
            vectors = code_to_vectors(code[None])
            costs = model.key_coder.atom_costs(vectors, (rows, cols), weight, np.float16)
            per_image.append(torch.from_numpy(costs).view(m, rows, cols, 2, n))
        stacked = per_image[0][None] if len(per_image) == 1 else torch.stack(per_image)
        return stacked.permute(4, 0, 1, 5, 2, 3).to(codes.device)

    return bias


def _grid(shape: tuple[int, ...], multiple: int) -> tuple[int, int]:
    """The code grid of a padded image."""
    return shape[0] // multiple, shape[1] // multiple


def _step_counter(
    progress: Callable[[int, int], None] | None, total: int
) -> Callable[[], None] | None:
    """A callback for each refinement step that tells ``progress`` (done, total)."""
    if progress is None or not total:
        return None
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        progress(done, total)

    return on_step


def _encode_region(run: _Encoding, pixels: np.ndarray, valid: np.ndarray) -> torch.Tensor:
    """Ternary code (1,m,n,h,w) of one padded region, computed tile by tile: the scores as the
    whole region's analysis gives them, and refinement steps whose error and gradient are summed
    over the tiles' inner parts, which is the whole region's refinement (the decoder sees less
    than the halo); memory follows the tile."""
    release_free_memory()  # what the last region freed
    grid = (pixels.shape[0] // run.multiple, pixels.shape[1] // run.multiple)
    x = torch.from_numpy(pixels)[None, None].to(run.device)
    mask = torch.from_numpy(valid)[None, None].to(run.device)
    tiles = [
        (outer, inner, run.tiling.within(outer, inner)) for outer, inner in run.tiling.tiles(grid)
    ]
    z = _region_scores(run, x, tiles, grid)
    if not run.refine_steps and run.rate is None:
        return run.network.ternarize(z, run.k).cpu()
    refine = _region_refinement(run, x, mask, tiles)
    return choose_code(run.network, z, run.k, run.refine_steps, refine, run.rate).cpu()


def _region_scores(
    run: _Encoding, x: torch.Tensor, tiles: list[tuple], grid: tuple[int, int]
) -> torch.Tensor:
    """The normalised scores of a region's pixels ``x``: the analysis of each tile, its inner
    part kept."""
    z = None
    with torch.no_grad():
        for outer, inner, within in tiles:
            part = run.network.analysis(x[..., *_scaled(outer, run.multiple)], normalize=False)
            part = part.float()
            if z is None:
                z = torch.zeros((1, *part.shape[1:3], *grid), device=run.device)
            z[..., inner[0], inner[1]] = part[..., *within]
    return run.network.normalize_scores(z)


def _region_refinement(
    run: _Encoding, x: torch.Tensor, mask: torch.Tensor, tiles: list[tuple]
) -> Callable[[torch.Tensor, int, torch.Tensor | None], torch.Tensor]:
    """``refine(scores, steps, bias)`` as `model.choose_code` takes it, for a region's pixels
    ``x``: steps on the mean error over the pixels ``mask`` counts, its error and gradient
    summed over the tiles' inner parts."""
    network, multiple = run.network, run.multiple
    area = mask.sum()

    def counted(outer: tuple[slice, slice], within: tuple[slice, slice]) -> torch.Tensor:
        """The mask of a tile's pixels that its error counts: those of its inner part, so that
        the tiles' errors add up once (made when needed: all tiles' masks would take as much
        memory as the image)."""
        region, inner = _scaled(outer, multiple), _scaled(within, multiple)
        tile_mask = torch.zeros(mask[..., *region].shape, device=run.device)
        tile_mask[..., *inner] = mask[..., *region][..., *inner]
        return tile_mask

    def refine(scores: torch.Tensor, steps: int, bias: torch.Tensor | None) -> torch.Tensor:
        def mean_error(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            error, gradient = scores.new_zeros(1), torch.zeros_like(scores)
            for outer, _, within in tiles:
                part_error, part_gradient = network.squared_error(
                    scores[..., outer[0], outer[1]],
                    x[..., *_scaled(outer, multiple)],
                    counted(outer, within),
                    run.k,
                    None if bias is None else bias[..., outer[0], outer[1]],
                )
                error += part_error
                gradient[..., outer[0], outer[1]] += part_gradient
            return error / area, gradient.div_(area)

        return refine_scores(scores, steps, mean_error, on_step=run.on_step)

    return refine


def _scaled(cells: tuple[slice, ...], factor: int) -> tuple[slice, ...]:
    """Code-position slices -> the pixel slices they cover."""
    return tuple(slice(c.start * factor, c.stop * factor) for c in cells)


def _padded_region(unit: np.ndarray, region: tuple[slice, slice]) -> np.ndarray:
    """``region`` (pixel slices within the padded image) of ``unit`` as `pad_to_multiple` pads
    the whole image (reflected at the bottom and right edges, which a region of a large image
    covers many times over), without a padded copy of the whole image."""
    rows, cols = region
    part = unit[rows, cols]
    extra = (rows.stop - rows.start - part.shape[0], cols.stop - cols.start - part.shape[1])
    return np.pad(part, ((0, extra[0]), (0, extra[1])), mode="reflect") if any(extra) else part


def _valid_mask(
    shape: tuple[int, int], region: tuple[slice, slice], dtype: type = np.float32
) -> np.ndarray:
    """Over ``region`` of the padded image: 1 on the image's own pixels (``shape``), 0 on the
    padding."""
    rows, cols = region
    valid = np.zeros((rows.stop - rows.start, cols.stop - cols.start), dtype=dtype)
    valid[: max(0, shape[0] - rows.start), : max(0, shape[1] - cols.start)] = 1
    return valid


def share_image(
    unit: np.ndarray,
    mapping: IntensityMapping,
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int | None = None,
    maps: list[int] | None = None,
    source: dict | None = None,
    dicom_header: str | None = None,
    refine_steps: int = REFINE_STEPS,
    progress: Callable[[int, int], None] | None = None,
    rate: RateControl | None = None,
) -> SharedImage:
    """One image through :func:`share_images`."""
    image = ImageToShare(unit, mapping, source or {}, dicom_header)
    shared = share_images(
        [image],
        model,
        obfuscation,
        k,
        maps,
        refine_steps=refine_steps,
        progress=progress,
        rate=rate,
    )
    return shared[0]


def fit_image_keys(
    model: LoadedModel, units: Iterable[np.ndarray], refine_steps: int = 0, couplings: bool = True
) -> KeyModel:
    """A key model (see `primis.keys.context`) fitted to the codes this model gives images in
    [0, 1] at its own k, one image at a time (so any number and size fits in memory), with
    ``couplings`` (`primis.keys.couplings`: smaller keys, coded in somewhat more time)."""
    k = model.network.config.k
    codes = (encode_images(model, [unit], k, refine_steps)[0] for unit in units)
    vectors = ((code_to_vectors(c), tuple(c.shape[3:])) for c in codes)
    return fit_key_model(vectors, k, couplings=couplings)


def _batches(shapes: list[tuple], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal shape, in chunks of at most ``batch_size``."""
    groups: dict[tuple, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return [
        members[start : start + batch_size]
        for members in groups.values()
        for start in range(0, len(members), batch_size)
    ]


def _package(
    image: ImageToShare,
    code: torch.Tensor,
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int,
    maps: list[int],
    rate_weight: float = 0.0,
    decoded: np.ndarray | None = None,
) -> SharedImage:
    """Ambiguate one image's code (chosen with ``rate_weight``) and write its public file and
    key; a model with a high-fidelity layer codes what the ``decoded`` code (decoded here where
    None) leaves of the image."""
    cfg = model.network.config
    vectors = code_to_vectors(code)
    public_vectors, perms = ambiguate_maps(vectors, cfg.m, k, obfuscation)
    _, _, _, rows, cols = code.shape
    grid, shown = (rows, cols), public_vectors
    if obfuscation.pad_size_class:  # strict only: the key codes the image's part alone
        grid, shown = pad_public(public_vectors, cfg.m, grid, cfg.downsampling)
    header = _public_header(model, obfuscation, k, grid, perms)
    coder = model.key_coder
    spec = key_spec(coder, maps, (rows, cols), k, obfuscation, perms)
    if not Tiling().fits((rows, cols), 1):  # a large image: return what encoding freed
        release_free_memory()  # before the key's coding tables
    payload, ideal = encode_key(coder, vectors, public_vectors, perms, spec)
    if ideal < MIN_KEY_BITS:
        raise PrimisError(
            f"image too small to share: its key would hold {ideal:.0f} bits, fewer than the "
            f"{MIN_KEY_BITS} that keep guessing it out of reach (use a larger image)"
        )
    key_header = _key_header(image, header, model.hash, coder, spec)
    if cfg.residual_psnr is not None:
        residual = _fidelity_layer(image, code, model, maps, decoded)
        payload += residual
        key_header = key_header.model_copy(update={"residual": len(residual)})
    public, key = seal_pair(PublicFile(header, shown), KeyFile(key_header, payload))
    return SharedImage(
        file_id=header.file_id,
        ideal_key_bits=ideal,
        pixels=image.unit.size,
        rate_weight=rate_weight,
        public=public,
        key=key,
    )


def _fidelity_layer(
    image: ImageToShare,
    code: torch.Tensor,
    model: LoadedModel,
    maps: list[int],
    decoded: np.ndarray | None = None,
) -> bytes:
    """The key's high-fidelity layer (`primis.fidelity`): what the ``code``, as ``decoded``
    (padded; decoded here where None), leaves of the image, coded to the model's
    ``residual_psnr``."""
    from primis.fidelity import code_residual, grid_steps

    cfg = model.network.config
    if len(maps) != cfg.m:
        raise PrimisError(
            "this model's keys carry a high-fidelity layer, which needs every code map: share"
            " without --maps"
        )
    rows, cols = image.unit.shape
    base = (decode_codes(model, [code])[0] if decoded is None else decoded)[:rows, :cols]
    return code_residual(image.unit, base, grid_steps(image.mapping), cfg.residual_psnr)


def _public_header(
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int,
    grid: tuple[int, int],
    perms: list[np.ndarray | None],
) -> PublicHeader:
    """The header of a new public file (a fresh file id) showing a code ``grid``."""
    cfg = model.network.config
    return PublicHeader(
        file_id=new_file_id(),
        model_hash=model.hash,
        grid=grid,
        n=cfg.n,
        m=cfg.m,
        k=k,
        noise=noise_count(cfg.n, k, obfuscation.fill),
        mask_signs=obfuscation.mask_signs,
        permuted=any(perm is not None for perm in perms),
        privacy=privacy_preset_name(obfuscation),
    )


def _key_header(
    image: ImageToShare, public: PublicHeader, model_hash: str, coder: KeyCoder, spec: KeySpec
) -> KeyHeader:
    """The header of the key to the public file of ``public`` (not yet sealed): the image's
    private side and how ``coder`` coded the payload."""
    return KeyHeader(
        file_id=public.file_id,
        public_sha256=UNSEALED,
        model_hash=model_hash,
        maps=list(spec.maps),
        shape=image.unit.shape,
        intensity=image.mapping.to_dict(),
        source=image.source,
        dicom_header=image.dicom_header,
        coding=coder.coding,
        variable_rate=spec.variable,
        privacy=public.privacy,
    )


def read_pair(
    public_bytes: bytes, key_bytes: bytes, public_name: str = "public file", key_name: str = "key"
) -> tuple[PublicFile, KeyFile]:
    """Parse a public file and its key, and check that they belong together (`open_pair`)."""
    return open_pair(public_bytes, key_bytes, public_name, key_name)


def _check_model(public: PublicFile, model: LoadedModel, name: str) -> None:
    if public.header.model_hash != model.hash:
        bundled = bundled_model_with_hash(public.header.model_hash)
        hint = f" (the bundled model {bundled}: use --model {bundled})" if bundled else ""
        raise PrimisError(
            f"{name} was made with model {public.header.model_hash[:12]}{hint}, "
            f"not the loaded model {model.hash[:12]}"
        )
    cfg = model.network.config
    if (public.header.n, public.header.m) != (cfg.n, cfg.m) or public.header.k > cfg.n // 2:
        raise PrimisError(f"{name}: code parameters do not fit the model")
    rows, cols = public.header.grid
    MAX_PIXELS.check(rows * cols * cfg.downsampling**2, name)


def recover_code(
    public: PublicFile, key: KeyFile, coder: KeyCoder, multiple: int = 0
) -> np.ndarray:
    """The true code vectors of the maps the key opens (other maps are zero), for a model whose
    keys ``coder`` codes. With the model's granularity ``multiple``, a public file padded to a
    size class gives the vectors of the image's grid only (`image_grid`)."""
    h = public.header
    grid = image_grid(h.grid, key.header.shape, multiple) if multiple else tuple(h.grid)
    shown = (
        public.vectors if grid == tuple(h.grid) else crop_grid(public.vectors, h.m, h.grid, grid)
    )
    spec = KeySpec(
        tuple(key.header.maps), grid, h.k, h.mask_signs, h.permuted, key.header.variable_rate
    )
    return decode_key(coder_for(key.header.coding, coder), key.code_payload, shown, spec)


def _device(model: LoadedModel) -> torch.device:
    return next(model.network.parameters()).device


def decode_codes(
    model: LoadedModel,
    codes: list[torch.Tensor],
    batch_size: int = BATCH_SIZE,
    tiling: Tiling | None = None,
) -> list[np.ndarray]:
    """Decode ternary codes (1,m,n,h,w) to [0,1] images of the padded size; codes with the same
    grid share a forward pass, and grids larger than one tile go tile by tile (see `Tiling`)."""
    tiling = tiling or Tiling()
    network, device = model.network, _device(model)
    multiple = network.config.downsampling
    images: list[np.ndarray | None] = [None] * len(codes)
    whole = [i for i, code in enumerate(codes) if tiling.fits(code.shape[3:], 1)]
    for indices in _batches([codes[i].shape for i in whole], batch_size):
        indices = [whole[i] for i in indices]
        decoded = network.decode(torch.cat([codes[i] for i in indices]).to(device))
        for row, i in enumerate(indices):
            images[i] = decoded[row, 0].float().cpu().numpy()
    for i in sorted(set(range(len(codes))) - set(whole)):
        grid = codes[i].shape[3:]
        image = np.zeros((grid[0] * multiple, grid[1] * multiple), dtype=np.float32)
        for outer, inner in tiling.tiles(grid):
            part = network.decode(codes[i][..., outer[0], outer[1]].to(device))[0, 0]
            within = _scaled(tiling.within(outer, inner), multiple)
            image[_scaled(inner, multiple)] = part[within].float().cpu().numpy()
        images[i] = image
    return images


def reconstruct_many(
    pairs: list[tuple[bytes, bytes]], model: LoadedModel, batch_size: int = BATCH_SIZE
) -> list[tuple[np.ndarray, KeyFile]]:
    """Authorized reconstructions (input dtype and range) of (public, key) pairs, batched."""
    opened = []
    for public_bytes, key_bytes in pairs:
        public, key = read_pair(public_bytes, key_bytes)
        _check_model(public, model, "public file")
        opened.append((key, opened_code(public, key, model)))
    units = decode_codes(model, [code for _, code in opened], batch_size)
    return [_restore(unit, key) for unit, (key, _) in zip(units, opened, strict=True)]


def opened_code(public: PublicFile, key: KeyFile, model: LoadedModel) -> torch.Tensor:
    """The code (1, m, n, rows, cols) the key opens, on the image's grid."""
    multiple = model.network.config.downsampling
    vectors = recover_code(public, key, model.key_coder, multiple)
    grid = image_grid(public.header.grid, key.header.shape, multiple)
    return vectors_to_code(vectors, public.header.m, grid)


def _restore(unit: np.ndarray, key: KeyFile, key_name: str = "key") -> tuple[np.ndarray, KeyFile]:
    rows, cols = key.header.shape
    if rows > unit.shape[0] or cols > unit.shape[1] or rows < 1 or cols < 1:
        raise PrimisError(f"{key_name}: image shape does not fit the public code")
    try:
        mapping = IntensityMapping.from_dict(key.header.intensity)
    except (KeyError, TypeError, ValueError):
        raise PrimisError(f"{key_name}: invalid intensity mapping") from None
    unit = unit[:rows, :cols]
    if key.header.residual:
        from primis.fidelity import add_residual, grid_steps

        unit = add_residual(unit, key.residual_payload, grid_steps(mapping), key_name)
    return mapping.inverse(unit), key


def reconstruct(
    public_bytes: bytes,
    key_bytes: bytes,
    model: LoadedModel,
    public_name: str = "public file",
    key_name: str = "key",
) -> tuple[np.ndarray, KeyFile]:
    """Authorized reconstruction in the input's own dtype and range, and the key it used."""
    public, key = read_pair(public_bytes, key_bytes, public_name, key_name)
    _check_model(public, model, public_name)
    unit = decode_codes(model, [opened_code(public, key, model)])[0]
    return _restore(unit, key, key_name)


def attacker_view(public_bytes: bytes, model: LoadedModel, name: str = "public file") -> np.ndarray:
    """What anyone decodes from the public file alone: its vectors decoded as they are."""
    public = PublicFile.from_bytes(public_bytes, name)
    _check_model(public, model, name)
    return decode_codes(
        model, [vectors_to_code(public.vectors, public.header.m, public.header.grid)]
    )[0]
