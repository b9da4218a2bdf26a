"""`primis demo`: the whole flow on one image, with a figure of what each party sees."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from primis.formats import PublicFile, key_path, public_path
from primis.io.files import write_atomic
from primis.io.images import encode_image, read_image
from primis.io.pixels import IntensityMapping
from primis.metrics import psnr, ssim
from primis.modelstore import LoadedModel
from primis.samples import DEMO_SAMPLE, SAMPLES_DIR
from primis.sharing import REFINE_STEPS, attacker_view, reconstruct, share_image


def chest_phantom(size: int = 512, seed: int = 0) -> np.ndarray:
    """A synthetic frontal chest radiograph (body, lungs, spine, ribs, heart), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    image = 0.25 + 0.5 * np.exp(-((((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.6) ** 2) ** 2))
    for centre in (0.3, 0.7):
        lung = ((xx - centre) / 0.17) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        image = np.where(lung, image - 0.35, image)
    image += 0.25 * (np.abs(xx - 0.5) < 0.04)
    image += 0.2 * np.exp(-(((xx - 0.56) / 0.12) ** 2 + ((yy - 0.62) / 0.1) ** 2))
    for rib in range(8):
        arc = np.abs(yy - (0.25 + 0.07 * rib) - 0.08 * (xx - 0.5) ** 2 * 4) < 0.012
        image += 0.12 * arc * (np.abs(xx - 0.5) < 0.4)
    image += 0.01 * rng.standard_normal(image.shape)
    from scipy.ndimage import gaussian_filter

    image = gaussian_filter(image, 2.0)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def code_picture(public: bytes, shape: tuple[int, int]) -> np.ndarray:
    """The public code of map 0 as a picture: each vector's entries tiled in its cell."""
    parsed = PublicFile.from_bytes(public)
    rows, cols = parsed.header.grid
    n = parsed.header.n
    side = int(np.ceil(np.sqrt(n)))
    tiles = np.zeros((rows, cols, side * side), dtype=np.float32)
    tiles[..., :n] = parsed.vectors[: rows * cols].reshape(rows, cols, n)
    mosaic = tiles.reshape(rows, cols, side, side).transpose(0, 2, 1, 3).reshape(rows * side, -1)
    picture = Image.fromarray(((mosaic + 1) * 127.5).astype(np.uint8))
    return np.asarray(picture.resize((shape[1], shape[0]), Image.NEAREST)) / 255.0


def figure(panels: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Panels side by side with captions, as PNG."""
    h, w = panels[0][1].shape
    canvas = Image.new("L", (w * len(panels) + 10 * (len(panels) - 1), h + 24), 255)
    draw = ImageDraw.Draw(canvas)
    for index, (caption, image) in enumerate(panels):
        x = index * (w + 10)
        tile = Image.fromarray((np.clip(image[:h, :w], 0, 1) * 255).astype(np.uint8))
        canvas.paste(tile, (x, 24))
        draw.text((x + 4, 5), caption, fill=0)
    buffer_path = Path(path)
    import io

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_atomic(buffer_path, buffer.getvalue())


def run_demo(
    model: LoadedModel,
    image_path: Path | None,
    out: Path,
    refine_steps: int = REFINE_STEPS,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Share one image (by default the bundled chest radiograph, `samples.DEMO_SAMPLE`),
    restore it with and without the key, write files and a figure; ``progress(done, total)``
    hears of each refinement step."""
    if image_path is None:
        image_path = SAMPLES_DIR / DEMO_SAMPLE
    unit, mapping = read_image(image_path)
    started = time.perf_counter()
    shared = share_image(
        unit, mapping, model, model.obfuscation, refine_steps=refine_steps, progress=progress
    )
    encoded = time.perf_counter()
    restored, _ = reconstruct(shared.public, shared.key, model)
    decoded = time.perf_counter()
    authorized = IntensityMapping.from_dict(mapping.to_dict()).forward(restored)
    attacker = attacker_view(shared.public, model)[: unit.shape[0], : unit.shape[1]]
    write_atomic(public_path(out, "image"), shared.public)
    write_atomic(key_path(out, "image"), shared.key, mode=0o600)
    write_atomic(
        out / "authorized.png", encode_image((authorized * 255).round().astype(np.uint8), ".png")
    )
    figure(
        [
            ("original", unit),
            ("public file (code map 0)", code_picture(shared.public, unit.shape)),
            ("authorized (with key)", authorized),
            ("attacker (no key)", attacker),
        ],
        out / "demo.png",
    )
    return {
        "input": str(image_path),
        "pixels": unit.shape,
        "public_bytes": len(shared.public),
        "key_bytes": len(shared.key),
        "key_bits_per_pixel": shared.key_bits_per_pixel,
        "authorized_psnr": psnr(unit, authorized),
        "authorized_ssim": ssim(unit, authorized),
        "attacker_psnr": psnr(unit, attacker),
        "attacker_ssim": ssim(unit, attacker),
        "encode_seconds": encoded - started,
        "decode_seconds": decoded - encoded,
        "figure": str(out / "demo.png"),
        "files": str(out),
    }


def train_demo_model(out: Path, minutes: float = 1.5) -> Path:
    """A small model trained on synthetic chest phantoms, for a first run without the zoo."""
    from primis.config import ModelConfig, RunConfig, TrainConfig
    from primis.train import train

    folder = out / "phantoms"
    for seed in range(12):
        write_atomic(folder / f"phantom{seed}.png", encode_image(chest_phantom(256, seed), ".png"))
    paths = sorted(folder.glob("*.png"))
    config = RunConfig(
        model=ModelConfig(stem=4, channels=[16, 32, 64], n=128, k=4, m=2),
        train=TrainConfig(
            steps=100000,
            max_minutes=minutes,
            crop=128,
            batch_size=8,
            validate_every=100,
            checkpoint_every=1000,
        ),
    )
    train(config, paths[2:], paths[:2], out, show_progress=False)
    return out


def report_lines(report: dict) -> list[str]:
    """What `primis demo` prints of `run_demo`'s report: the input, the sizes, both views'
    quality and the figure."""
    return [
        f"input {report['input']} ({report['pixels'][0]}x{report['pixels'][1]})",
        f"public file {report['public_bytes']} B, key {report['key_bytes']} B "
        f"({report['key_bits_per_pixel']:.3f} bits per pixel)",
        f"with the key:    PSNR {report['authorized_psnr']:.2f} dB, "
        f"SSIM {report['authorized_ssim']:.3f}",
        f"without the key: PSNR {report['attacker_psnr']:.2f} dB, "
        f"SSIM {report['attacker_ssim']:.3f}",
        f"figure: {report['figure']}  (original | public code | authorized | attacker)",
    ]
