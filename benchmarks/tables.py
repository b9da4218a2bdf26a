"""Regenerate the Markdown tables of the docs that come from committed benchmark JSON.

    python -m benchmarks.tables           # rewrite them in place
    python -m benchmarks.tables --check   # exit 1, naming the stale documents

Each table lies in its document between marker comments::

    <!-- BEGIN GENERATED NAME (python -m benchmarks.tables, from JSON) -->
    ...
    <!-- END GENERATED NAME -->

and is made from its JSON by the benchmark's own renderer, the one that printed it when it
measured, so a document shows what its JSON holds (tests/test_tables.py checks it).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import design_study, linkage, rate_distortion
from primis.io.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Table:
    """A generated block: its name in the markers, the document that holds it, the JSON it is
    made from and the function that renders that JSON."""

    name: str
    document: Path
    source: Path
    render: Callable[[dict], str]


def _design_study(report: dict) -> str:
    return design_study.table(report["pilots"]) + "\n"


TABLES = (
    Table(
        "linkage", ROOT / "docs" / "linkage.md", ROOT / "docs" / "linkage.json", linkage.markdown
    ),
    Table(
        "design-study",
        ROOT / "MODEL_CARD.md",
        ROOT / "docs" / "design-study" / "design_study.json",
        _design_study,
    ),
    Table(
        "rate-distortion-v4",
        ROOT / "MODEL_CARD.md",
        ROOT / "docs" / "v4" / "rate_distortion.json",
        rate_distortion.markdown,
    ),
)


def regenerated(text: str, name: str, block: str) -> str:
    """``text`` with the content between the markers of ``name`` replaced by ``block``;
    ValueError where the markers are not there exactly once."""
    pattern = re.compile(
        rf"(<!-- BEGIN GENERATED {re.escape(name)}\b[^>]*-->\n)(.*?)(<!-- END GENERATED "
        rf"{re.escape(name)} -->)",
        re.DOTALL,
    )
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"expected one block of generated table {name!r}, found {len(found)}")
    return pattern.sub(lambda match: match[1] + block + match[3], text)


def updated(table: Table) -> str:
    """``table``'s document with its block made anew from the JSON."""
    block = table.render(json.loads(table.source.read_text()))
    return regenerated(table.document.read_text(), table.name, block)


def stale(tables: tuple[Table, ...] = TABLES) -> list[Path]:
    """The documents whose generated blocks differ from what their JSON gives."""
    return sorted({t.document for t in tables if updated(t) != t.document.read_text()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale documents")
    args = parser.parse_args()
    if args.check:
        out_of_date = stale()
        for path in out_of_date:
            print(f"{path.relative_to(ROOT)}: tables differ from their JSON", file=sys.stderr)
        sys.exit(1 if out_of_date else 0)
    for table in TABLES:
        write_atomic(table.document, updated(table).encode())


if __name__ == "__main__":
    main()
