"""Human reports: Markdown tables and figures (rows of images) beside the JSON results."""

from __future__ import annotations

import io
import json
import platform
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from primis.io.files import write_atomic


def image_rows(
    columns: dict[str, list[np.ndarray]], rows: int, path: Path, size: int = 192
) -> None:
    """A grid: one row per target, one captioned column per method, as PNG."""
    names = list(columns)
    canvas = Image.new("L", (len(names) * (size + 6), rows * (size + 6) + 22), 255)
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((c * (size + 6) + 2, 4), name[:30], fill=0)
        for r in range(min(rows, len(columns[name]))):
            tile = (np.clip(columns[name][r], 0, 1) * 255).astype(np.uint8)
            canvas.paste(
                Image.fromarray(tile).resize((size, size)), (c * (size + 6), 22 + r * (size + 6))
            )
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=float).encode())


# CPU flags that decide which kernels run; benchmarks print them with every figure.
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_info() -> dict:
    """The CPU model, its speed-relevant flags, torch's kernel level and threads, and the numeric
    type the inference and training paths use on this CPU (bfloat16 only where native)."""
    import torch

    from primis.model import use_autocast

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name":
                model = value.strip()
            elif name.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    low_precision = use_autocast(torch.device("cpu"), amp=True)
    return {
        "cpu": model,
        "flags": [flag for flag in SPEED_FLAGS if flag in flags],
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": "bfloat16 autocast" if low_precision else "float32",
    }


def describe_machine(info: dict) -> str:
    """One line for a benchmark table's caption."""
    return (
        f"{info['cpu']} ({' '.join(info['flags'])}; torch kernels {info['kernels']}), "
        f"{info['threads']} threads, torch {info['torch']}, {info['dtype']}"
    )


class Chart:
    """A grayscale chart: a white canvas with x and y axes over ``x_range`` x ``y_range``,
    axis titles and ``ticks`` tick labels each (count, x format, y format; an empty x format
    for categories on x: no x labels); `at` maps data to pixels, `draw` is Pillow's
    handle, `png` the finished image."""

    def __init__(
        self,
        size: tuple[int, int],
        margin: int,
        x_range: tuple[float, float],
        y_range: tuple[float, float],
        titles: tuple[str, str],
        ticks: tuple[int, str, str] = (5, ".2f", ".0f"),
    ) -> None:
        self.width, self.height = size
        self.margin, (self.x0, self.x1), (self.y0, self.y1) = margin, x_range, y_range
        self.canvas = Image.new("L", size, 255)
        self.draw = ImageDraw.Draw(self.canvas)
        self.draw.line([self.at(self.x0, self.y0), self.at(self.x1, self.y0)], fill=0)
        self.draw.line([self.at(self.x0, self.y0), self.at(self.x0, self.y1)], fill=0)
        self.draw.text((self.width // 2 - 60, self.height - 22), titles[0], fill=0)
        self.draw.text((4, 6), titles[1], fill=0)
        count, x_format, y_format = ticks
        for value in np.linspace(self.y0, self.y1, count):
            self.draw.text((5, self.at(self.x0, value)[1] - 6), f"{value:{y_format}}", fill=0)
        for value in np.linspace(self.x0, self.x1, count) if x_format else ():
            where = (self.at(value, self.y0)[0] - 12, self.height - margin + 6)
            self.draw.text(where, f"{value:{x_format}}", fill=0)

    def at(self, x: float, y: float) -> tuple[float, float]:
        span = (self.width - 2 * self.margin, self.height - 2 * self.margin)
        return (
            self.margin + (x - self.x0) / (self.x1 - self.x0) * span[0],
            self.height - self.margin - (y - self.y0) / (self.y1 - self.y0) * span[1],
        )

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.canvas.save(buffer, format="PNG")
        return buffer.getvalue()
