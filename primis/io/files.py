"""Writing files so that a crash or a full disk never leaves half of one in place.

Every write goes to a temporary file beside its destination (``.NAME.PID.XXXXXXXX.part``),
is flushed to disk, then renamed into place; :func:`clean_stale_parts` removes the temporary
files a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def default_mode() -> int:
    """0666 less the process umask: the mode of a new file that holds nothing secret."""
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


def write_temporary(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` durably to a temporary file beside ``path`` (named
    ``.NAME.PID.XXXXXXXX.part``, so a rerun can tell a dead writer's leftovers) and return it.
    ``mode`` defaults to :func:`default_mode`; secrets pass 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".part"
    )
    try:
        os.fchmod(fd, default_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    tmp = write_temporary(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries to disk, so that files renamed into it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temporaries(files: list[tuple[Path, bytes, int | None]]) -> list[Path]:
    """Write each of ``files`` (destination, data, mode) to a temporary beside its destination
    (see `write_temporary`) and return the temporaries; on a failure none is left."""
    temps: list[Path] = []
    try:
        for path, data, mode in files:
            temps.append(write_temporary(path, data, mode))
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    return temps


def place_together(moves: list[tuple[Path, Path]], before: Callable[[], None]) -> None:
    """Rename temporaries into place (``moves``: temporary, destination) after ``before`` runs
    (e.g. the manifest line). On a failure the temporaries go, and once a file was placed,
    every destination of the group goes too."""
    placed = False
    try:
        before()
        for temp, path in moves:
            os.replace(temp, path)
            placed = True
    except BaseException:
        for temp, _ in moves:
            temp.unlink(missing_ok=True)
        for _, path in moves if placed else []:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise


_PART = re.compile(r"^\..*\.(\d+)\.[A-Za-z0-9_]{8}\.part$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def clean_stale_parts(folder: Path, max_age_seconds: float = 600.0) -> int:
    """Remove temporary files a killed writer left in ``folder``: at once when the process that
    wrote one (its id is in the name) is gone, otherwise after the age limit, so a concurrent
    shard's write in progress is never touched."""
    removed = 0
    if folder.is_dir():
        for part in folder.glob(".*.part"):
            owner = _PART.match(part.name)
            try:
                dead = owner is not None and not _alive(int(owner.group(1)))
                if dead or time.time() - part.stat().st_mtime > max_age_seconds:
                    part.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
