"""Clinical utility: does a lung-segmentation network work as well on reconstructions?

A small U-Net is trained on original radiographs (downsampled to a fixed size) with their lung
masks; its Dice is then measured on the targets' originals, their authorized reconstructions
and the attacker's best images. A second U-Net trained on authorized reconstructions shows what
a user who only ever sees reconstructions gets.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from skimage.transform import resize
from torch import nn
from tqdm import tqdm

from primis.errors import PrimisError
from primis.io.images import read_pixels

SIZE = 128


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.ReLU(),
    )


class SmallUNet(nn.Module):
    """Three-level U-Net, (B,1,H,W) -> lung logits (B,1,H,W)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.down1, self.down2 = _block(1, width), _block(width, 2 * width)
        self.bottom = _block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.down1(x)
        b = self.down2(nn.functional.max_pool2d(a, 2))
        c = self.bottom(nn.functional.max_pool2d(b, 2))
        b = self.dec2(torch.cat([self.up2(c), b], 1))
        return self.out(self.dec1(torch.cat([self.up1(b), a], 1)))


def mask_for(image_path: Path, mask_dir: Path) -> Path:
    candidates = [mask_dir / f"{image_path.stem}{s}" for s in (".png", ".tif", ".npy", ".jpg")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise PrimisError(f"{image_path.name}: no mask with the same stem in {mask_dir}")
    return found


def small(image: np.ndarray) -> np.ndarray:
    return resize(image, (SIZE, SIZE), anti_aliasing=True).astype(np.float32)


def load_mask(path: Path) -> np.ndarray:
    return small((read_pixels(path) > 0).astype(np.float32)) > 0.5


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    overlap = np.logical_and(prediction, truth).sum()
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * overlap / total)


def train_unet(
    images: list[np.ndarray], masks: list[np.ndarray], steps: int, seed: int = 0
) -> SmallUNet:
    """Train on (image, mask) pairs at SIZE x SIZE with flips; Dice + BCE loss."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = SmallUNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    x_all = torch.from_numpy(np.stack(images))[:, None]
    y_all = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    for _ in tqdm(range(steps), desc="U-Net", leave=False, disable=None):
        index = [rng.randrange(len(images)) for _ in range(16)]
        x, y = x_all[index], y_all[index]
        if rng.random() < 0.5:
            x, y = x.flip(3), y.flip(3)
        logits = net(x)
        probability = torch.sigmoid(logits)
        soft_dice = 1 - (2 * (probability * y).sum() + 1) / (probability.sum() + y.sum() + 1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y) + soft_dice
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def segment(net: SmallUNet, images: list[np.ndarray]) -> list[np.ndarray]:
    x = torch.from_numpy(np.stack(images))[:, None]
    return list((net(x)[:, 0] > 0).numpy())


def utility_study(
    train_images: list[np.ndarray],
    train_masks: list[np.ndarray],
    reconstruct: Callable[[list[np.ndarray]], list[np.ndarray]],
    test_views: dict[str, list[np.ndarray]],
    test_masks: list[np.ndarray],
    steps: int,
) -> dict:
    """Mean Dice of a U-Net trained on originals (and one on reconstructions) per test view.

    Images are full-size [0,1] arrays; ``reconstruct`` maps them to authorized
    reconstructions (for the second U-Net); ``test_views`` holds, per name, one image per test
    mask (originals first).
    """
    on_originals = train_unet([small(i) for i in train_images], train_masks, steps)
    on_reconstructions = train_unet(
        [small(i) for i in reconstruct(train_images)], train_masks, steps
    )
    result = {}
    for name, images in test_views.items():
        shrunk = [small(i) for i in images]
        for label, net in (
            ("trained_on_originals", on_originals),
            ("trained_on_reconstructions", on_reconstructions),
        ):
            scores = [dice(p, t) for p, t in zip(segment(net, shrunk), test_masks, strict=True)]
            result.setdefault(name, {})[label] = float(np.mean(scores))
    return result
