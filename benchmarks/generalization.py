"""The bundled model on chest X-rays it was not tuned to: held-out images changed in size,
framing, exposure and bit depth (a stand-in for other sources; no data leaves shared/).

    python benchmarks/generalization.py --model cxr

For each variant: mean authorized PSNR/SSIM and key bits per pixel over the 25 held-out images.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from skimage.transform import resize

from primis.io.images import read_image
from primis.io.pixels import IntensityMapping
from primis.metrics import psnr, ssim
from primis.modelstore import load_model
from primis.report import write_json
from primis.sharing import reconstruct, share_image

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split


def _crop(image: np.ndarray, share: float) -> np.ndarray:
    h, w = image.shape
    top, left = int(h * (1 - share) / 2), int(w * (1 - share) / 2)
    return image[top : h - top, left : w - left]


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "as is (8-bit, ~500x400)": lambda i: np.rint(i * 255).astype(np.uint8),
    "512x512 resized": lambda i: np.rint(resize(i, (512, 512)) * 255).astype(np.uint8),
    "1024x1024 upscaled, 12-bit": lambda i: np.rint(resize(i, (1024, 1024)) * 4095).astype(
        np.uint16
    ),
    "256x256 downscaled": lambda i: np.rint(resize(i, (256, 256), anti_aliasing=True) * 255).astype(
        np.uint8
    ),
    "central 70% crop": lambda i: np.rint(_crop(i, 0.7) * 255).astype(np.uint8),
    "darker exposure (gamma 1.5)": lambda i: np.rint(i**1.5 * 255).astype(np.uint8),
    "brighter exposure (gamma 0.67)": lambda i: np.rint(i ** (1 / 1.5) * 255).astype(np.uint8),
    "inverted (MONOCHROME1-like)": lambda i: np.rint((1 - i) * 255).astype(np.uint8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cxr")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=Path("runs/generalization.json"))
    args = parser.parse_args()
    model = load_model(args.model)
    images = [read_image(p)[0] for p in holdout_split(args.data)["test"]]
    report = {}
    for name, change in VARIANTS.items():
        scores, similarities, bpp = [], [], []
        for image in images:
            pixels = change(image)
            mapping = IntensityMapping.of(pixels)
            unit = mapping.forward(pixels)
            shared = share_image(unit, mapping, model, model.obfuscation)
            restored, _ = reconstruct(shared.public, shared.key, model)
            scores.append(psnr(unit, mapping.forward(restored)))
            similarities.append(ssim(unit, mapping.forward(restored)))
            bpp.append(8 * len(shared.key) / unit.size)
        report[name] = {
            "psnr": float(np.mean(scores)),
            "ssim": float(np.mean(similarities)),
            "key_bpp": float(np.median(bpp)),
        }
    print(f"{'variant':34s} {'PSNR dB':>8s} {'SSIM':>6s} {'key bpp':>8s}  ({len(images)} images)")
    for name, row in report.items():
        print(f"{name:34s} {row['psnr']:8.2f} {row['ssim']:6.3f} {row['key_bpp']:8.3f}")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
