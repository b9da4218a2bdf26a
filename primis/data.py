"""Training data: image lists, reproducible (grouped) splits, and a Dataset of random crops."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from primis.errors import PrimisError
from primis.io.files import write_atomic
from primis.io.images import list_images, read_image


def resolve_sources(source: Path) -> list[Path]:
    """A folder (searched recursively), a single image, or a list file (.txt, .lst, no suffix)
    of paths relative to the list's folder.

    A list naming files that do not exist fails here, before any work starts.
    """
    source = Path(source)
    if source.is_dir():
        paths = list_images([source])
    elif source.is_file() and source.suffix.lower() not in (".txt", ".lst", ".csv", ""):
        paths = [source]  # a single image
    elif source.is_file():
        try:
            lines = [ln.strip() for ln in source.read_text().splitlines()]
        except (OSError, UnicodeDecodeError) as err:
            raise PrimisError(f"{source}: not a readable list file ({err})") from None
        paths = [source.parent / ln for ln in lines if ln and not ln.startswith("#")]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise PrimisError(
                f"{source}: {len(missing)} listed files are missing, e.g. {missing[0]}"
            )
    else:
        raise PrimisError(f"{source}: no such file or folder")
    if not paths:
        raise PrimisError(f"{source}: no images found")
    return paths


def write_split_lists(
    paths: list[Path], out_dir: Path, ratios: tuple[float, ...], seed: int, group_by: str | None
) -> dict[str, tuple[int, Path]]:
    """`split_paths`, written as OUT_DIR/train.txt, valid.txt and test.txt (paths relative to
    ``out_dir``); per split, its count and list file."""
    written = {}
    for name, part in split_paths(paths, ratios, seed, group_by).items():
        lines = "".join(f"{Path(os.path.relpath(p, out_dir)).as_posix()}\n" for p in part)
        write_atomic(out_dir / f"{name}.txt", lines.encode())
        written[name] = len(part), out_dir / f"{name}.txt"
    return written


def split_paths(
    paths: list[Path], ratios: tuple[float, ...], seed: int, group_by: str | None = None
) -> dict[str, list[Path]]:
    """Sort, shuffle with ``random.Random(seed)``, and cut into train/valid/test by ratios.

    With ``group_by`` (a regular expression searched in each file name; its first group, or the
    whole match, is the group key) whole groups are shuffled and kept inside one split. Valid and
    test sizes round down, so train gets the remainder.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise PrimisError("--ratios needs three non-negative numbers (train valid test)")
    groups: dict[str, list[Path]] = {}
    for path in sorted(paths):
        groups.setdefault(_group_key(path, group_by), []).append(path)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    total = sum(ratios)
    wanted = {
        "valid": int(len(paths) * ratios[1] / total),
        "test": int(len(paths) * ratios[2] / total),
    }
    parts: dict[str, list[Path]] = {"train": [], "valid": [], "test": []}
    # Fill test from the end, then valid, then everything else is train.
    for key in reversed(keys):
        members = groups[key]
        target = next(
            (name for name in ("test", "valid") if len(parts[name]) < wanted[name]), "train"
        )
        parts[target][:0] = members
    return parts


def _group_key(path: Path, pattern: str | None) -> str:
    if pattern is None:
        return str(path)
    try:
        found = re.search(pattern, path.name)
    except re.error as err:
        raise PrimisError(f"--group-by: invalid regular expression ({err})") from None
    if not found:
        raise PrimisError(f"--group-by: '{pattern}' does not match {path.name}")
    return found.group(1) if found.groups() else found.group(0)


def scan_images(paths: list[Path], strict: bool) -> tuple[list[Path], list[str]]:
    """Paths whose images decode, and a 'path: reason' line for each that does not.

    With ``strict`` the first unreadable file stops everything with a PrimisError.
    """
    good, problems = [], []
    for path in paths:
        try:
            read_image(path)
            good.append(path)
        except PrimisError as err:
            if strict:
                raise
            problems.append(str(err))
    return good, problems


class RandomCropDataset(Dataset):
    """Random square crops in [0, 1] (float32, shape (1, crop, crop)) from a list of images, at
    the images' own resolution.

    Images are decoded on first use and kept in memory (per DataLoader worker); smaller images
    are reflect-padded. Augmentations for radiographs, each drawn per crop from torch's
    generator (which DataLoader seeds per worker): horizontal flip; scale (a region of
    ``crop * 2**u`` pixels, u uniform in [-scale_jitter, scale_jitter], resized to ``crop``);
    exposure (gamma in [1-g, 1+g]); inversion (as MONOCHROME1 stores it); sensor noise (std
    uniform in [0, noise]); and quantisation to one of ``bit_depths``.
    """

    def __init__(
        self,
        paths: list[Path],
        crop: int,
        hflip: bool = True,
        gamma_jitter: float = 0.0,
        scale_jitter: float = 0.0,
        invert: float = 0.0,
        noise: float = 0.0,
        bit_depths: list[int] | None = None,
    ) -> None:
        self.paths = list(paths)
        self.crop = crop
        self.hflip = hflip
        self.gamma_jitter = gamma_jitter
        self.scale_jitter = scale_jitter
        self.invert = invert
        self.noise = noise
        self.bit_depths = list(bit_depths or [])
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        if index not in self._cache:
            self._cache[index] = read_image(self.paths[index])[0]
        return self._cache[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.image(index)
        side = self.crop
        if self.scale_jitter:
            side = round(self.crop * 2 ** (self.scale_jitter * (2 * float(torch.rand(())) - 1)))
        h, w = image.shape
        if h < side or w < side:
            ph, pw = max(0, side - h), max(0, side - w)
            mode = "reflect" if ph < h and pw < w else "edge"
            image = np.pad(image, ((0, ph), (0, pw)), mode=mode)
            h, w = image.shape
        top = int(torch.randint(0, h - side + 1, ()))
        left = int(torch.randint(0, w - side + 1, ()))
        patch = torch.from_numpy(np.ascontiguousarray(image[top : top + side, left : left + side]))
        if side != self.crop:
            patch = torch.nn.functional.interpolate(
                patch[None, None], size=(self.crop, self.crop), mode="bilinear", antialias=True
            )[0, 0].clamp(0, 1)
        if self.hflip and torch.rand(()) < 0.5:
            patch = patch.flip(1)
        if self.gamma_jitter:
            gamma = 1 + self.gamma_jitter * (2 * float(torch.rand(())) - 1)
            patch = patch.clamp(min=0) ** gamma
        if self.invert and torch.rand(()) < self.invert:
            patch = 1 - patch
        if self.noise:
            patch = (patch + self.noise * float(torch.rand(())) * torch.randn_like(patch)).clamp(
                0, 1
            )
        if self.bit_depths:
            levels = 2 ** self.bit_depths[int(torch.randint(0, len(self.bit_depths), ()))] - 1
            patch = torch.round(patch * levels) / levels
        return patch.unsqueeze(0)


def code_crops(
    pairs: list[tuple[np.ndarray, torch.Tensor]],
    cells: int,
    downsampling: int,
    count: int,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random crops of ``cells`` x ``cells`` code positions and the pixels they cover.

    ``pairs`` hold an image padded to the code grid and its code (1,m,n,h,w); returns codes
    (count,m,n,cells,cells) and pixels (count,1,side,side) with side = cells * downsampling.
    """
    codes, pixels = [], []
    side = cells * downsampling
    for _ in range(count):
        image, code = rng.choice(pairs)
        rows, cols = code.shape[3:]
        top, left = rng.randrange(rows - cells + 1), rng.randrange(cols - cells + 1)
        codes.append(code[..., top : top + cells, left : left + cells])
        y, x = top * downsampling, left * downsampling
        pixels.append(image[y : y + side, x : x + side])
    return torch.cat(codes), torch.from_numpy(np.stack(pixels))[:, None]
