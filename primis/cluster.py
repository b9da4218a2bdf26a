"""Batches of `ambiguate` and `disambiguate` (`share_many`, `restore_many`), here or on a Dask
cluster (``--cluster``).

Without a client, a batch runs in this process (or ``workers`` processes, see
`primis.batch.run_batch`). With one, the client (this process) skips the inputs whose outputs
exist, as a local batch does, and submits the others, a bounded number at a time. Each worker
loads the model once (`worker_model`), reads its input from shared storage and stages the pair
beside its destinations (`primis.api.stage_share`, the work of one file of `ambiguate`); the
client alone places each pair after its manifest line (`SharingOutputs.commit`), so the
manifests have one writer and list the batch in input order. Dask reruns the tasks of a lost
worker elsewhere; a killed client leaves whole pairs with their manifest lines, so a rerun
completes what is missing.

The cluster needs the ``cluster`` extra (``pip install 'primis[cluster]'``): Dask is imported
only on use. Workers need PRIMIS installed and the inputs, outputs and model at the same paths
(or the model by a bundled name).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from primis.api import (
    FileSharer,
    Identity,
    Names,
    SharedFile,
    ShareOptions,
    load_model,
    named_by_id,
    output_stem,
    restore_report,
    share_settings,
    stage_share,
)
from primis.batch import (
    BatchProgress,
    BatchResult,
    Outcome,
    SharingOutputs,
    StagedPair,
    attempt,
    duplicate_stems,
    expand,
    output_folders,
    run_batch,
)
from primis.errors import PrimisError
from primis.formats import is_public_file
from primis.io.files import clean_stale_parts
from primis.io.images import is_image_file
from primis.keywrap import KeyWrapping
from primis.modelstore import ZOO, LoadedModel

if TYPE_CHECKING:
    from distributed import Client, Future

MISSING_EXTRA = "--cluster needs Dask: pip install 'primis[cluster]'"


@contextlib.contextmanager
def connect(address: str) -> Iterator[Client]:
    """A client of the Dask scheduler at ``address``, or, for ``local:N``, of a cluster of N
    single-threaded worker processes on this machine (each runs torch on cores / N threads)."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise PrimisError(MISSING_EXTRA) from None
    if not address.startswith("local:"):
        with Client(address) as client:
            yield client
        return
    try:
        workers = int(address.removeprefix("local:"))
    except ValueError:
        workers = 0
    if workers < 1:
        raise PrimisError(f"--cluster {address}: expected local:N with N >= 1, or an address")
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    environ = {"distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": threads}
    with (
        dask.config.set(environ),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,  # not its warnings on shutdown
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def model_reference(model: LoadedModel) -> str:
    """How workers find ``model``: a bundled model's name, or its directory (shared storage)."""
    directory = model.directory.resolve()
    return directory.name if directory.parent == ZOO.resolve() else str(directory)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_MODELS: dict[tuple[str, str, str], LoadedModel] = {}  # this worker process's, see worker_model
_LOADING = threading.Lock()


def worker_model(reference: str, digest: str, device: str) -> LoadedModel:
    """The model ``reference`` on ``device``, loaded once per process; a model whose hash is
    not ``digest`` (the client's) is refused."""
    with _LOADING:
        key = (reference, digest, device)
        if key not in _MODELS:
            _keep_freed_memory()
            model = load_model(reference, device)
            if model.hash != digest:
                raise PrimisError(
                    f"{reference}: this worker's model is {model.hash[:12]}, the client's "
                    f"{digest[:12]} (give a bundled name or a path on shared storage)"
                )
            _MODELS[key] = model
        return _MODELS[key]


def _keep_freed_memory() -> None:
    """Undo, in this worker process, the ``MALLOC_TRIM_THRESHOLD_`` that Dask's nanny sets: it
    turns off glibc's adaptive mmap threshold, so every large buffer torch frees goes back to
    the OS and the next one is mapped and faulted in anew, which slows the model down. These
    are the limits glibc's adaptive threshold reaches after large frees."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the variable means nothing there
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


def share_many(
    paths: Iterable[str | os.PathLike],
    public_dir: str | os.PathLike,
    key_dir: str | os.PathLike,
    model: LoadedModel | str | os.PathLike | None = None,
    *,
    client: Client | None = None,
    workers: int = 1,
    device: str = "auto",
    names: Names = "id",
    overwrite: bool = False,
    wrapping: KeyWrapping | None = None,
    **options: Unpack[ShareOptions],
) -> BatchResult:
    """`primis ambiguate`: every input (files, folders searched recursively, glob patterns)
    shared as `primis.api.share_file` shares it, here (in ``workers`` processes) or on the
    workers of a Dask ``client``, with the same outputs, manifests, skips and reports;
    ``model`` is loaded here and in each worker (by bundled name or shared path) on
    ``device``. Keys are written wrapped with ``wrapping`` (`primis.keywrap.KeyWrapping`; on
    a cluster for recipients only, since a passphrase would travel to the workers). A failed
    file is reported and counted; a full disk stops the batch."""
    if client is not None and wrapping is not None and wrapping.passphrase:
        raise PrimisError("--cluster wraps keys for --to recipients only, not with a passphrase")
    items = expand(paths, is_image_file)
    model = model if isinstance(model, LoadedModel) else load_model(model, device)
    settings = share_settings(model, options, stacklevel=3)  # warns here, once
    reference, public_dir, key_dir = model_reference(model), Path(public_dir), Path(key_dir)
    clashes = duplicate_stems([path for path in items if not named_by_id(path, names)])
    sources = {path: str(path.absolute()) for path in items}
    previous: dict[Path, dict | None] = {}
    order = [sources[p] for p in items]
    with SharingOutputs(public_dir, key_dir, wrapping, order) as outputs:
        if client is None:
            sharer = FileSharer(
                str(model.directory), device, public_dir, key_dir, settings, names, overwrite,
                wrapping,
            ).reuse(model, outputs)  # fmt: skip
            return run_batch(items, sharer.report, "ambiguate", clashes, workers)

        def submit(path: Path) -> Future | None:
            source = sources[path]
            prior = outputs.previous(source, output_stem(path, names))
            if not overwrite and outputs.done(source, prior):
                return None
            previous[path] = prior
            stage = functools.partial(
                stage_share,
                public_dir=public_dir,
                key_dir=key_dir,
                names=names,
                source=source,
                settings=settings,
                wrapping=wrapping,
            )
            return client.submit(
                _share_task, path, stage, reference, model.hash, device, pure=False
            )

        def finish(path: Path, staged: tuple[StagedPair, SharedFile]) -> str:
            outputs.commit(staged[0], previous.pop(path))
            return staged[1].summary()

        return run_on_cluster(client, items, submit, finish, "ambiguate", clashes)


def _share_task(
    path: Path, stage: Callable[..., Any], reference: str, digest: str, device: str
) -> tuple[Outcome, Any]:
    """On a worker: `stage_share` one input with the worker's model, as an `attempt`."""
    return attempt(lambda p: stage(p, model=worker_model(reference, digest, device)), path)


def restore_many(
    paths: Iterable[str | os.PathLike],
    key_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    model: LoadedModel | str | os.PathLike | None = None,
    *,
    client: Client | None = None,
    device: str = "auto",
    identity: Identity = None,
    passphrase: str | None = None,
    mode: int = 0o600,
    overwrite: bool = False,
    without_key: bool = False,
) -> BatchResult:
    """`primis disambiguate`: every public file (or folder of them) restored with
    KEY_DIR/<stem>.primiskey (see `primis.api.restore_report`), here or on the workers of a
    Dask ``client``. Wrapped keys open with ``identity`` or ``passphrase``; on a cluster only
    with ``identity`` as a private key file the workers read."""
    items = expand(paths, is_public_file)
    model = model if isinstance(model, LoadedModel) else load_model(model, device)
    reference, out_dir = model_reference(model), Path(out_dir)
    output_folders(out_dir)
    clean_stale_parts(out_dir)
    if client is not None and (passphrase is not None or isinstance(identity, X25519PrivateKey)):
        raise PrimisError("on a cluster, wrapped keys open with an identity file only")
    restore = functools.partial(
        restore_report,
        key_dir=key_dir,
        out_dir=out_dir,
        identity=identity,
        passphrase=passphrase,
        mode=mode,
        overwrite=overwrite,
        without_key=without_key,
    )
    clashes = duplicate_stems(items)
    if client is None:
        return run_batch(items, functools.partial(restore, model=model), "disambiguate", clashes)

    def submit(path: Path) -> Future:
        task = (_restore_task, path, restore, reference, model.hash, device)
        return client.submit(*task, pure=False)

    return run_on_cluster(client, items, submit, lambda _, report: report, "disambiguate", clashes)


def _restore_task(
    path: Path, restore: Callable[..., str], reference: str, digest: str, device: str
) -> tuple[Outcome, str]:
    """On a worker: `restore_report` for one public file with the worker's model."""
    return attempt(lambda p: restore(p, model=worker_model(reference, digest, device)), path)


def run_on_cluster(
    client: Client,
    items: list[Path],
    submit: Callable[[Path], Future | None],
    finish: Callable[[Path, Any], str],
    label: str,
    failed: dict[Path, str],
) -> BatchResult:
    """Run a batch's items on the cluster with a progress bar here (`BatchProgress`), as they
    complete. ``submit`` returns an item's future (its result an `attempt`), or None to skip
    it; ``finish`` turns a done item's result into its report, here (e.g. commits it). At most
    a few tasks per worker thread wait at a time, so a batch of any size keeps little state."""
    from distributed import as_completed

    pending = iter([path for path in items if path not in failed])
    running: dict[Future, Path] = {}
    completed = as_completed()

    window, asked = 4, 0.0  # how many tasks to keep in flight; when the scheduler was asked

    def refill(progress: BatchProgress) -> None:
        nonlocal window, asked
        if time.monotonic() - asked > 1:  # workers come and go (e.g. adaptive clusters)
            window, asked = max(4, 2 * sum(client.nthreads().values())), time.monotonic()
        while len(running) < window:
            path = next(pending, None)
            if path is None:
                return
            outcome, future = attempt(submit, path)
            if outcome != Outcome.DONE:
                progress.record(path, outcome, future)
            elif future is None:
                progress.record(path, Outcome.SKIPPED, "")
            else:
                running[future] = path
                completed.add(future)

    with BatchProgress(items, label, failed) as progress:
        try:
            refill(progress)
            for future in completed:
                path = running.pop(future)
                try:
                    outcome, result = future.result()
                except Exception as err:  # the task was lost (e.g. its workers kept dying)
                    reason = f"{path}: {type(err).__name__}: {err}"
                    outcome, result = Outcome.FAILED, reason.splitlines()[0]
                future.release()
                if outcome == Outcome.DONE:
                    outcome, result = attempt(lambda p, r=result: finish(p, r), path)
                progress.record(path, outcome, result)
                refill(progress)
        finally:
            client.cancel(list(running))
    return progress.result()
