"""Batch plumbing shared by `ambiguate` and `disambiguate`: inputs, shards, manifests, the
output folders of a sharing batch, the loop.

A batch expands files, folders (recursively) and glob patterns; `--shard I/N` keeps every N-th
item from the I-th (0-based), for job arrays; each item runs on its own, so one failure (bad
input, a name too long, any OS error) is reported (path and reason) and the batch goes on,
while a full or read-only disk stops it with one message; the loop returns what it did
(:class:`BatchResult`), which the command line sums up.

Manifests are JSON lines, one record per key (the input, or the file id), the last one
winning; every change happens under an exclusive lock beside the file, so concurrent shards
lose nothing, and :meth:`Manifest.compact` rewrites the file with each key once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import glob
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from primis.errors import PrimisError
from primis.formats import KeyFile, PublicFile, key_path, public_path, read_file, sha256
from primis.io.files import (
    clean_stale_parts,
    default_mode,
    place_together,
    write_temporaries,
    write_temporary,
)
from primis.keywrap import KeyWrapping, is_wrapped


class Outcome(StrEnum):
    """What became of one item of a batch."""

    DONE = "done"
    SKIPPED = "skipped"  # its outputs exist (a rerun)
    FAILED = "failed"  # reported; the batch goes on
    FATAL = "fatal"  # no later item can succeed (a full or read-only disk): the batch stops


T = TypeVar("T")
# OS errors after which no later file of the batch can succeed: stop with one message.
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# Without a terminal (a log), a batch's count and time left go to stderr at most this often.
LOG_PROGRESS_SECONDS = 30.0


def expand(items: Iterable[Path | str], wanted: Callable[[Path], bool]) -> list[Path]:
    """Files as given; folders searched recursively for files ``wanted`` accepts; glob patterns
    expanded. An input that names nothing (a typo) is an error before anything is written."""
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
        elif not path.exists():
            raise PrimisError(f"{item}: no such file or folder")
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


def _open_private(path: Path, flags: int, mode: int) -> int:
    """os.open that never follows a symbolic link and leaves the file with ``mode``."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PrimisError(f"{path}: is a symbolic link; refusing to write through it") from None
        raise
    if flags & os.O_CREAT and os.fstat(fd).st_mode & 0o7777 != mode:
        os.fchmod(fd, mode)
    return fd


class Manifest:
    """A JSON-lines file of records, one per value of ``key``; see the module docstring."""

    def __init__(self, path: Path, key: str, mode: int | None = None) -> None:
        self.path, self.key = Path(path), key
        self.mode = default_mode() if mode is None else mode

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the manifest's lock (``.NAME.lock`` beside it) for a read-modify-write."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(f".{self.path.name}.lock")
        fd = _open_private(lock, os.O_RDWR | os.O_CREAT, self.mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def records(self) -> dict[str, dict]:
        """The last record of every key (lines that are not JSON objects are ignored)."""
        try:
            fd = _open_private(self.path, os.O_RDONLY, self.mode)
        except FileNotFoundError:
            return {}
        with os.fdopen(fd, "rb") as handle:
            lines = handle.read().splitlines()
        found: dict[str, dict] = {}
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get(self.key), str):
                    found.pop(record[self.key], None)
                    found[record[self.key]] = record
        return found

    def append(self, record: dict) -> None:
        """Append one record in a single write."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self.locked():
            fd = _open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, self.mode)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def replace(self, records: Iterable[dict]) -> None:
        """Rewrite the file atomically with these records (caller holds :meth:`locked`)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        os.replace(write_temporary(self.path, text, self.mode), self.path)

    def compact(self, order: Sequence[str] = ()) -> dict[str, dict]:
        """Rewrite the file with each key once (its last record) and return the records: the
        keys of ``order`` last, in that order, the others before them as they were."""
        rank = {key: index for index, key in enumerate(order)}
        with self.locked():
            found = self.records().values()
            records = {
                r[self.key]: r for r in sorted(found, key=lambda r: rank.get(r[self.key], -1))
            }
            self.replace(records.values())
        return records


def output_folders(*folders: Path) -> None:
    """Create the output folders; one that is a file (or cannot be made) stops the batch."""
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise PrimisError(f"{folder}: exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise PrimisError(f"{folder}: cannot create the folder ({err.strerror})") from None


class SharingOutputs:
    """The output side of `primis ambiguate`: public files and keys in two folders, with their
    manifests. KEY_DIR/manifest.jsonl (0600) maps each input to its file id, public file and
    key; PUBLIC_DIR/manifest.jsonl lists only file ids, digests and sizes (none when both
    folders are one: the private manifest holds all it would).

    Opening it creates the folders (a new key folder 0700) and removes a killed writer's
    temporary files; closing it (the end of a ``with`` block) rewrites both manifests with each
    entry once, the inputs of ``order`` (a batch's, as manifest keys) last and in that order,
    whichever finished first. With ``wrapping`` (`primis.keywrap.KeyWrapping`: recipients
    and/or a passphrase) every key is encrypted in memory before it is staged (`stage_pair`):
    no plain key, not even a temporary one, reaches the key folder.
    """

    def __init__(
        self,
        public_dir: Path,
        key_dir: Path,
        wrapping: KeyWrapping | None = None,
        order: Sequence[str] = (),
    ) -> None:
        self.public_dir, self.key_dir = Path(public_dir), Path(key_dir)
        self.wrapping, self.order = wrapping, list(order)
        output_folders(self.public_dir)
        if not self.key_dir.exists():
            output_folders(self.key_dir.parent)
            with contextlib.suppress(FileExistsError):
                self.key_dir.mkdir(mode=0o700)
        output_folders(self.key_dir)
        for folder in (self.public_dir, self.key_dir):
            clean_stale_parts(folder)
        self.private = Manifest(self.key_dir / "manifest.jsonl", "input", mode=0o600)
        same_folder = self.public_dir.resolve() == self.key_dir.resolve()
        self.public = (
            None if same_folder else Manifest(self.public_dir / "manifest.jsonl", "file_id")
        )
        self.known = self.private.records()

    def __enter__(self) -> SharingOutputs:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            with contextlib.suppress(OSError, PrimisError):
                self.close()  # best effort: the rerun compacts what this one could not

    def previous(self, source: str, stem: str | None) -> dict | None:
        """The record of an input's earlier outputs: its manifest line or, for a ``stem``-named
        input, a complete pair already on disk (from a run that wrote no manifest line)."""
        if source in self.known or stem is None:
            return self.known.get(source)
        public_file = public_path(self.public_dir, stem)
        try:
            public = read_file(public_file)
            file_id = PublicFile.from_bytes(public).header.file_id
        except PrimisError:
            return None
        record = {
            "input": source,
            "file_id": file_id,
            "public": str(public_file.absolute()),
            "key": str(key_path(self.key_dir, stem).absolute()),
            "public_sha256": sha256(public),
        }
        return record if _pair_complete(record) else None

    def done(self, source: str, record: dict | None) -> bool:
        """Whether ``record``'s public file and key are in place and belong together; a pair
        from before manifests were written first then gets its manifest line."""
        if record is None or not _pair_complete(record):
            return False
        if source not in self.known:
            self.private.append(record)
            self.known[source] = record
        return True

    def commit(self, staged: StagedPair, previous: dict | None) -> dict:
        """Place a staged pair (see `stage_pair`) with its private manifest line written first
        (see `place_together`), remove the input's outputs under other names, and return the
        record. Only this object writes the manifests."""
        record = staged.record
        destinations = (Path(record["key"]), Path(record["public"]))
        place_together(
            list(zip(staged.temporaries, destinations, strict=True)),
            lambda: self.private.append(record),
        )
        self.known[record["input"]] = record
        _remove_replaced(previous, record)
        if self.public is not None:
            self.public.append(_public_entry(record, staged.public_bytes))
        return record

    def close(self) -> None:
        """Rewrite the manifests with each entry once; the public one from the private one."""
        records = self.private.compact(self.order)
        for folder in (self.public_dir, self.key_dir):
            clean_stale_parts(folder)  # a lost worker's staged pairs (their writer is gone)
        if self.public is not None:
            with self.public.locked():
                self.public.replace(
                    _public_entry(r, Path(r["public"]).stat().st_size)
                    for r in records.values()
                    if isinstance(r.get("public"), str) and Path(r["public"]).is_file()
                )


@dataclass(frozen=True)
class StagedPair:
    """A public file and its key written to temporaries beside their destinations (see
    `stage_pair`), to be placed by `SharingOutputs.commit`; small enough to travel from a
    worker to the process that writes the manifests."""

    record: dict
    public_bytes: int
    temporaries: tuple[Path, Path]  # the key's, the public file's


def stage_pair(
    public_dir: Path,
    key_dir: Path,
    source: str,
    name: str,
    file_id: str,
    public: bytes,
    key: bytes,
    wrapping: KeyWrapping | None = None,
) -> StagedPair:
    """Write NAME.primiskey (0600; wrapped in memory first with ``wrapping``) and NAME.primis
    to temporaries in their folders and return them with the input's manifest record; nothing
    is in place until `SharingOutputs.commit`."""
    if wrapping is not None:
        key = wrapping.wrap(key)
    public_file = public_path(Path(public_dir), name).absolute()
    key_file = key_path(Path(key_dir), name).absolute()
    record = {
        "input": source,
        "file_id": file_id,
        "public": str(public_file),
        "key": str(key_file),
        "public_sha256": sha256(public),
    }
    key_temp, public_temp = write_temporaries([(key_file, key, 0o600), (public_file, public, None)])
    return StagedPair(record, len(public), (key_temp, public_temp))


def _public_entry(record: dict, size: int) -> dict:
    """A public manifest line: file id, digest and size, nothing about the input."""
    return {"file_id": record["file_id"], "public_sha256": record["public_sha256"], "bytes": size}


def _remove_replaced(old: dict | None, new: dict) -> None:
    """Delete the outputs an input had before it was redone under other names (file-id names
    change on every run); only files beside the new ones, of the same kind, are touched."""
    for field in ("public", "key"):
        before = old.get(field) if old else None
        if not isinstance(before, str):
            continue
        before, after = Path(before), Path(new[field])
        beside = (before.parent, before.suffix) == (after.parent, after.suffix)
        if before.is_absolute() and beside and before != after:
            before.unlink(missing_ok=True)


def _pair_complete(record: dict) -> bool:
    """Whether a manifest record's public file and key are both in place and belong together
    (a wrapped key counts as its key)."""
    try:
        public, key = read_file(Path(record["public"])), read_file(Path(record["key"]))
        if sha256(public) != record.get("public_sha256"):
            return False
        return is_wrapped(key) or KeyFile.from_bytes(key).header.public_sha256 == sha256(public)
    except (PrimisError, KeyError, TypeError):
        return False


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: the reason, and the file it concerned."""
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or type(err).__name__}{where}"


@dataclass(frozen=True)
class BatchResult:
    """What a batch did: items done, items skipped (their outputs existed), and the reason of
    each item that failed."""

    items: int
    done: int
    skipped: int
    failures: dict[Path, str]


def run_batch(
    items: list[Path],
    work: Callable[[Path], str],
    label: str,
    failed: dict[Path, str],
    workers: int = 1,
) -> BatchResult:
    """Run ``work`` on every item with a progress bar (on a terminal) and return what was done.

    ``work`` returns a one-line report (written above the bar), or `Outcome.SKIPPED` when the
    outputs already exist. ``failed`` holds items that failed before the batch (e.g. name
    clashes). Skipped items leave the bar's total, so its rate and time left count only the
    work done. A full or read-only disk stops the batch with a PrimisError. With ``workers``
    > 1, that many processes run the items (``work`` must then pickle, see `worker_pool`) and
    the reports still come in the items' order.
    """
    with BatchProgress(items, label, failed) as progress, worker_pool(workers) as pool:
        pending = [path for path in items if path not in failed]
        attempts = functools.partial(attempt, work)
        outcomes = map(attempts, pending) if pool is None else pool.map(attempts, pending)
        for path, (outcome, report) in zip(pending, outcomes, strict=True):
            progress.record(path, outcome, report)
    return progress.result()


class BatchProgress:
    """A batch's progress bar on stderr (on a terminal; in a log, a line with the count and the
    time left every `LOG_PROGRESS_SECONDS`) and its tally: each item's outcome (see `attempt`)
    is recorded once, its report written above the bar. ``failed`` holds items that failed
    before the batch (reported at once)."""

    def __init__(self, items: list[Path], label: str, failed: dict[Path, str]) -> None:
        self.items, self.done, self.skipped, self.label = len(items), 0, 0, label
        self.failures = dict(failed)
        show = sys.stderr.isatty()
        self.log = not show
        self.started = self.logged = time.monotonic()
        self.bar = tqdm(
            total=len(items), desc=label, unit="file", disable=not show, file=sys.stderr
        )
        for path in items:
            if path in failed:
                tqdm.write(f"error: {failed[path]}", file=sys.stderr)
                self.bar.update(1)

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(self, *error: object) -> None:
        self.bar.close()

    def record(self, path: Path, outcome: Outcome, report: str) -> None:
        """Count one item; a "fatal" outcome stops the batch with a PrimisError."""
        if outcome == Outcome.FATAL:
            raise PrimisError(f"{report}; batch stopped after {self.done} done (rerun to go on)")
        if outcome == Outcome.SKIPPED:
            self.skipped += 1
            self.bar.total -= 1
            self.bar.refresh()
        elif outcome == Outcome.DONE:
            self.done += 1
            tqdm.write(report)
            self.bar.update(1)
        else:
            self.failures[path] = report
            tqdm.write(f"error: {report}", file=sys.stderr)
            self.bar.update(1)
        self._log_progress()

    def _log_progress(self) -> None:
        """Without a terminal: "LABEL: N/M files, T elapsed, about T left" on stderr, at most
        every `LOG_PROGRESS_SECONDS`."""
        now = time.monotonic()
        if not self.log or now - self.logged < LOG_PROGRESS_SECONDS:
            return
        self.logged = now
        finished, total = self.done + len(self.failures), self.items - self.skipped
        elapsed = now - self.started
        left = elapsed / finished * (total - finished) if finished else 0.0
        print(
            f"{self.label}: {finished}/{total} files, {_clock(elapsed)} elapsed, "
            f"about {_clock(left)} left",
            file=sys.stderr,
            flush=True,
        )

    def result(self) -> BatchResult:
        return BatchResult(self.items, self.done, self.skipped, self.failures)


def _clock(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    minutes, whole = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{whole:02d}"


def attempt(work: Callable[[Path], T], path: Path) -> tuple[Outcome, T | str]:
    """``work(path)`` as (outcome, result): DONE with what it returned, SKIPPED (when it
    returned `Outcome.SKIPPED`), FAILED with the reason (a bad input, an OS error or a bug: the
    batch goes on), or FATAL for an OS error after which no file can succeed (`FATAL_ERRNOS`)."""
    try:
        report = work(path)
    except OSError as err:
        reason = f"{path}: {describe_os_error(err)}"
        return (Outcome.FATAL if err.errno in FATAL_ERRNOS else Outcome.FAILED), reason
    except PrimisError as err:
        return Outcome.FAILED, str(err)
    except Exception as err:  # a bug must not stop the batch; say what it was
        return Outcome.FAILED, f"{path}: unexpected {type(err).__name__}: {err}".splitlines()[0]
    if isinstance(report, str) and report == Outcome.SKIPPED:
        return Outcome.SKIPPED, ""
    return Outcome.DONE, report


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` processes (None for 1) that share this machine's cores: each runs torch on
    cores / workers threads. They start fresh (spawn: no state of this process, nor its thread
    pools, is inherited), so the work they get must pickle (module-level functions and plain
    data), and each one loads what it needs once (e.g. `primis.api.FileSharer`)."""
    if workers < 1:
        raise PrimisError(f"workers {workers}: expected at least 1")
    if workers == 1:
        yield None
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _start_worker, (threads,)) as pool:
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _start_worker(threads: int) -> None:
    """A worker's torch threads."""
    import torch

    torch.set_num_threads(threads)
