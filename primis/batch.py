"""Batch plumbing shared by `ambiguate` and `disambiguate`: inputs, shards, manifests, the loop.

A batch expands files, folders (recursively) and glob patterns; `--shard I/N` keeps every N-th
item from the I-th (0-based), for job arrays; each item runs on its own, so one failure is
reported (path and reason) and the batch goes on; a summary closes it.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import click
from tqdm import tqdm

from primis.errors import PrimisError

SKIPPED = "skipped"


def expand(items: Iterable[Path | str], wanted: Callable[[Path], bool]) -> list[Path]:
    """Files as given; folders searched recursively for files ``wanted`` accepts; glob patterns
    expanded."""
    found: list[Path] = []
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file() and wanted(p))
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise PrimisError(f"{item}: the pattern matches nothing")
            found.extend(p for p in matches if p.is_file())
        else:
            found.append(path)
    unique = list(dict.fromkeys(found))
    return unique


def parse_shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise PrimisError(f"--shard {spec}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise PrimisError(f"--shard {spec}: I must lie in 0..N-1")
    return index, count


def select_shard(items: list[Path], spec: str | None) -> list[Path]:
    index, count = parse_shard(spec)
    return items[index::count]


def duplicate_stems(items: list[Path]) -> dict[Path, str]:
    """Inputs whose outputs would collide (same stem), each with the reason."""
    seen: dict[str, Path] = {}
    clashes: dict[Path, str] = {}
    for path in items:
        if path.stem in seen:
            clashes[path] = f"{path}: same output name as {seen[path.stem]} (stem '{path.stem}')"
        else:
            seen[path.stem] = path
    return clashes


def append_jsonl(path: Path, record: dict, mode: int = 0o644) -> None:
    """Append one JSON line in a single write (safe with concurrent shards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def clean_stale_parts(folder: Path, max_age_seconds: float = 600.0) -> int:
    """Remove temporary files a killed writer left in ``folder`` (older than the age limit,
    so a concurrent shard's write in progress is never touched)."""
    import time

    removed = 0
    if folder.is_dir():
        for part in folder.glob(".*.part"):
            try:
                if time.time() - part.stat().st_mtime > max_age_seconds:
                    part.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def run_batch(
    items: list[Path], work: Callable[[Path], str], label: str, failed: dict[Path, str]
) -> None:
    """Run ``work`` on every item with a progress bar; raise PrimisError at the end if any failed.

    ``work`` returns a one-line report, or :data:`SKIPPED` when the outputs already exist.
    ``failed`` holds items that failed before the batch (e.g. name clashes).
    """
    done = skipped = 0
    failures = dict(failed)
    show = sys.stderr.isatty()
    with tqdm(items, desc=label, unit="file", disable=not show, file=sys.stderr) as bar:
        for path in bar:
            if path in failures:
                tqdm.write(f"error: {failures[path]}", file=sys.stderr)
                continue
            try:
                report = work(path)
            except PrimisError as err:
                failures[path] = str(err)
                tqdm.write(f"error: {err}", file=sys.stderr)
                continue
            if report == SKIPPED:
                skipped += 1
            else:
                done += 1
                tqdm.write(report)
    click.echo(
        f"{label}: {done} done, {skipped} skipped (outputs exist; --overwrite to redo), "
        f"{len(failures)} failed"
    )
    if failures:
        raise PrimisError(f"{len(failures)} of {len(items)} file(s) failed")
