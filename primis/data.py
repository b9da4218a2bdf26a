"""Training data: image lists, reproducible splits, and a Dataset of random crops."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from primis.errors import PrimisError
from primis.imageio import list_images, read_image


def resolve_sources(source: Path) -> list[Path]:
    """A folder (searched recursively) or a list file of paths relative to the list's folder."""
    source = Path(source)
    if source.is_dir():
        paths = list_images([source])
    elif source.is_file():
        lines = [ln.strip() for ln in source.read_text().splitlines()]
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


def split_paths(paths: list[Path], ratios: tuple[float, ...], seed: int) -> dict[str, list[Path]]:
    """Sort, shuffle with ``random.Random(seed)``, and cut into train/valid/test by ratios.

    The cut sizes round down for valid and test, so train gets the remainder.
    """
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise PrimisError("--ratios needs three non-negative numbers (train valid test)")
    ordered = sorted(paths)
    random.Random(seed).shuffle(ordered)
    total = sum(ratios)
    n_valid = int(len(ordered) * ratios[1] / total)
    n_test = int(len(ordered) * ratios[2] / total)
    n_train = len(ordered) - n_valid - n_test
    return {
        "train": ordered[:n_train],
        "valid": ordered[n_train : n_train + n_valid],
        "test": ordered[n_train + n_valid :],
    }


class RandomCropDataset(Dataset):
    """Random square crops in [0, 1] (float32, shape (1, crop, crop)) from a list of images.

    Images are decoded once and kept in memory as they are first used; smaller images are
    reflect-padded. Each item draws its crop from a torch generator, so DataLoader workers and
    seeds behave as torch documents.
    """

    def __init__(self, paths: list[Path], crop: int, flips: bool = True) -> None:
        self.paths = list(paths)
        self.crop = crop
        self.flips = flips
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> np.ndarray:
        if index not in self._cache:
            self._cache[index] = read_image(self.paths[index])[0]
        return self._cache[index]

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.image(index)
        h, w = image.shape
        if h < self.crop or w < self.crop:
            ph, pw = max(0, self.crop - h), max(0, self.crop - w)
            image = np.pad(
                image, ((0, ph), (0, pw)), mode="reflect" if ph < h and pw < w else "edge"
            )
            h, w = image.shape
        top = int(torch.randint(0, h - self.crop + 1, ()))
        left = int(torch.randint(0, w - self.crop + 1, ()))
        patch = torch.from_numpy(
            np.ascontiguousarray(image[top : top + self.crop, left : left + self.crop])
        )
        if self.flips and torch.rand(()) < 0.5:
            patch = patch.flip(1)
        return patch.unsqueeze(0)
