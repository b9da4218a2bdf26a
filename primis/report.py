"""Human reports: Markdown tables and figures (rows of images) beside the JSON results."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from primis.imageio import write_atomic


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
