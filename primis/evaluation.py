"""Measuring a model on real images: quality with and without the key, key size, speed."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from primis.config import ObfuscationConfig
from primis.io.images import read_image
from primis.metrics import ms_ssim, psnr, ssim
from primis.modelstore import LoadedModel
from primis.sharing import REFINE_STEPS, attacker_view, reconstruct, share_image


@dataclass(frozen=True)
class SharingRecord:
    """One image through the whole pipeline (PSNR/SSIM on the [0, 1] intensity scale)."""

    image: str
    pixels: int
    authorized_psnr: float
    authorized_ssim: float
    authorized_ms_ssim: float | None
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
    refine_steps: int = REFINE_STEPS,
) -> SharingRecord:
    """Ambiguate and disambiguate one image; score both reconstructions against the input."""
    unit, mapping = read_image(path)
    started = time.perf_counter()
    shared = share_image(unit, mapping, model, obfuscation, k, refine_steps=refine_steps)
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
        authorized_ms_ssim=ms_ssim(unit, authorized),
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
    multi = [r.authorized_ms_ssim for r in records if r.authorized_ms_ssim is not None]
    summary["mean_authorized_ms_ssim"] = float(np.mean(multi)) if multi else None
    summary["median_key_bits_per_pixel"] = statistics.median(r.key_bits_per_pixel for r in records)
    summary["images"] = len(records)
    summary["records"] = [asdict(r) | {"key_bits_per_pixel": r.key_bits_per_pixel} for r in records]
    return summary


def _codec_round_trip(image: np.ndarray, codec: str, bpp: float) -> tuple[np.ndarray, float]:
    """An 8-bit image through JPEG or JPEG 2000 (Pillow) at about ``bpp`` bits per pixel.

    JPEG 2000 is asked for the rate directly; JPEG's quality is searched for the largest file
    not above the rate. Returns the decoded image in [0, 1] and the bits per pixel spent.
    """
    import io

    from PIL import Image

    pixels = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))

    def encode(**options) -> bytes:
        buffer = io.BytesIO()
        pixels.save(buffer, format="JPEG2000" if codec == "jpeg2000" else "JPEG", **options)
        return buffer.getvalue()

    if codec == "jpeg2000":
        data = encode(quality_mode="rates", quality_layers=[8.0 / bpp], irreversible=True)
    else:
        budget = bpp * image.size / 8
        low, high, data = 1, 95, encode(quality=1)
        while low <= high:
            middle = (low + high) // 2
            candidate = encode(quality=middle)
            if len(candidate) <= budget:
                data, low = candidate, middle + 1
            else:
                high = middle - 1
    decoded = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 255
    return decoded, 8 * len(data) / image.size


def rate_distortion(paths: list[Path], records_by_k: dict[int, list[SharingRecord]]) -> list[dict]:
    """Mean PSNR/SSIM and key bits per pixel for each k (from :func:`measure_sharing` records of
    ``paths``), with JPEG and JPEG 2000 at the same bits per pixel on the same images, 8-bit."""
    images = [read_image(p)[0] for p in paths]
    rows = []
    for k, records in sorted(records_by_k.items()):
        bpp = float(np.mean([r.key_bits_per_pixel for r in records]))
        row = {
            "k": k,
            "key_bpp": bpp,
            "primis_psnr": float(np.mean([r.authorized_psnr for r in records])),
            "primis_ssim": float(np.mean([r.authorized_ssim for r in records])),
        }
        for codec in ("jpeg", "jpeg2000"):
            outs = [_codec_round_trip(i, codec, bpp) for i in images]
            row[f"{codec}_bpp"] = float(np.mean([b for _, b in outs]))
            row[f"{codec}_psnr"] = float(
                np.mean([psnr(i, o) for i, (o, _) in zip(images, outs, strict=True)])
            )
            row[f"{codec}_ssim"] = float(
                np.mean([ssim(i, o) for i, (o, _) in zip(images, outs, strict=True)])
            )
        rows.append(row)
    return rows


def rd_plot(rows: list[dict], path: Path) -> None:
    """PSNR against bits per pixel for PRIMIS keys, JPEG and JPEG 2000, as a small PNG."""
    from primis.io.files import write_atomic
    from primis.report import Chart

    series = {
        "PRIMIS key": ("key_bpp", "primis_psnr", 0),
        "JPEG": ("jpeg_bpp", "jpeg_psnr", 90),
        "JPEG 2000": ("jpeg2000_bpp", "jpeg2000_psnr", 170),
    }
    xs = [r[x] for r in rows for x, _, _ in series.values()]
    ys = [r[y] for r in rows for _, y, _ in series.values() if np.isfinite(r[y])]
    chart = Chart(
        (640, 420),
        50,
        (0.0, max(xs) * 1.1),
        (min(ys) - 1, max(ys) + 1),
        ("bits per pixel", "PSNR (dB)"),
    )
    for index, (name, (x, y, shade)) in enumerate(series.items()):
        points = [chart.at(r[x], r[y]) for r in rows]
        if len(points) > 1:
            chart.draw.line(points, fill=shade, width=2 + index)
        for px, py in points:
            chart.draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline=shade, width=2)
        chart.draw.text((chart.width - 150, 20 + 16 * index), f"{name}", fill=shade)
    write_atomic(path, chart.png())


def evaluate(
    model: LoadedModel,
    paths: list[Path],
    ks: list[int] | None = None,
    refine_steps: int = REFINE_STEPS,
) -> dict:
    """Every image shared and restored at the model's k (the summary) and at each of ``ks``
    (default 1..k; the rate-distortion rows, against JPEG and JPEG 2000)."""
    model_k = model.network.config.k
    k_values = ks or list(range(1, model_k + 1))
    records_by_k = {
        k: [measure_sharing(model, p, model.obfuscation, k, refine_steps) for p in paths]
        for k in sorted(set(k_values) | {model_k})
    }
    return {
        "model_hash": model.hash,
        "images": len(paths),
        "summary": summarize(records_by_k[model_k]),
        "rd": rate_distortion(paths, {k: records_by_k[k] for k in k_values}),
    }


def write_report(report: dict, out: Path) -> str:
    """Write OUT/evaluate.json, OUT/evaluate.md and OUT/rate_distortion.png for an `evaluate`
    report; return the Markdown."""
    from primis.io.files import write_atomic
    from primis.report import markdown_table, write_json

    rows, summary = report["rd"], report["summary"]
    write_json(out / "evaluate.json", report)
    rd_plot(rows, out / "rate_distortion.png")
    columns = {
        "k": "k",
        "key_bpp": "key bpp",
        "primis_psnr": "PRIMIS PSNR",
        "jpeg_bpp": "JPEG bpp",
        "jpeg_psnr": "JPEG PSNR",
        "jpeg2000_bpp": "JPEG2000 bpp",
        "jpeg2000_psnr": "JPEG2000 PSNR",
    }
    table = markdown_table(list(columns.values()), [[r[c] for c in columns] for r in rows])
    text = (
        f"# PRIMIS evaluation\n\nModel `{report['model_hash'][:16]}` on {report['images']} "
        f"images.\n\n"
        f"Authorized PSNR {summary['mean_authorized_psnr']:.2f} dB (mean), SSIM "
        f"{summary['mean_authorized_ssim']:.4f}, MS-SSIM "
        f"{summary['mean_authorized_ms_ssim'] or float('nan'):.4f}; "
        f"key {summary['median_key_bytes']:.0f} B per "
        f"image, {summary['median_key_bits_per_pixel']:.3f} bits per pixel (medians).\n\n"
        f"{table}\n\n![rate-distortion](rate_distortion.png)\n"
    )
    write_atomic(out / "evaluate.md", text.encode())
    return text
