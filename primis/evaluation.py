"""Measuring a model on real images: quality with and without the key, key size, speed."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from primis.config import ObfuscationConfig
from primis.imageio import read_image
from primis.metrics import psnr, ssim
from primis.modelstore import LoadedModel
from primis.sharing import attacker_view, reconstruct, share_image


@dataclass(frozen=True)
class SharingRecord:
    """One image through the whole pipeline (PSNR/SSIM on the [0, 1] intensity scale)."""

    image: str
    pixels: int
    authorized_psnr: float
    authorized_ssim: float
    without_key_psnr: float
    without_key_ssim: float
    key_bytes: int
    key_payload_ideal_bytes: float
    public_bytes: int
    encode_seconds: float
    decode_seconds: float

    @property
    def key_bits_per_pixel(self) -> float:
        return 8 * self.key_bytes / self.pixels


def measure_sharing(
    model: LoadedModel,
    path: Path,
    obfuscation: ObfuscationConfig,
    k: int | None = None,
) -> SharingRecord:
    """Ambiguate and disambiguate one image; score both reconstructions against the input."""
    unit, mapping = read_image(path)
    started = time.perf_counter()
    shared = share_image(unit, mapping, model, obfuscation, k)
    encoded = time.perf_counter()
    restored, _ = reconstruct(shared.public, shared.key, model)
    decoded = time.perf_counter()
    authorized = mapping.forward(restored)
    attacker = attacker_view(shared.public, model)[: unit.shape[0], : unit.shape[1]]
    return SharingRecord(
        image=Path(path).name,
        pixels=unit.size,
        authorized_psnr=psnr(unit, authorized),
        authorized_ssim=ssim(unit, authorized),
        without_key_psnr=psnr(unit, attacker),
        without_key_ssim=ssim(unit, attacker),
        key_bytes=len(shared.key),
        key_payload_ideal_bytes=shared.ideal_key_bits / 8,
        public_bytes=len(shared.public),
        encode_seconds=encoded - started,
        decode_seconds=decoded - encoded,
    )


def summarize(records: list[SharingRecord]) -> dict:
    """Medians (and means of quality) over records, plus the per-image rows."""
    fields = [
        "authorized_psnr",
        "authorized_ssim",
        "without_key_psnr",
        "without_key_ssim",
        "key_bytes",
        "public_bytes",
        "encode_seconds",
        "decode_seconds",
    ]
    summary = {f"median_{f}": statistics.median(getattr(r, f) for r in records) for f in fields}
    summary["mean_authorized_psnr"] = float(np.mean([r.authorized_psnr for r in records]))
    summary["mean_authorized_ssim"] = float(np.mean([r.authorized_ssim for r in records]))
    summary["median_key_bits_per_pixel"] = statistics.median(r.key_bits_per_pixel for r in records)
    summary["images"] = len(records)
    summary["records"] = [asdict(r) | {"key_bits_per_pixel": r.key_bits_per_pixel} for r in records]
    return summary
