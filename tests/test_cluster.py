"""Batches on a Dask cluster (`--cluster`, `primis.share_many`): the same outputs as
`ambiguate`, a failed file, a worker killed mid-batch, a client killed and its command rerun.

Dask is imported plainly: without the ``cluster`` extra these tests fail rather than skip.

"Equal" outputs: the same file names in both folders, manifests with the same inputs in the same
order naming the same files, and pairs that restore to the same pixels (codes are deterministic
for a model and refine settings; the noise, the file ids and so the bytes are random).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from PIL import Image

import primis
from primis.cluster import restore_many, share_many
from primis.sharing import read_pair
from tests.conftest import assert_clean_failure, assert_restored_alike, cxr_images, run_cli


def _cluster() -> LocalCluster:
    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with _cluster() as cluster, Client(cluster) as connected:
        yield connected


@pytest.fixture(scope="module")
def model() -> primis.api.LoadedModel:
    return primis.load_model("cxr", "cpu")


def _images(count: int) -> list[Path]:
    images = cxr_images()[:count]
    if len(images) < count:
        pytest.skip(f"needs {count} real chest X-rays, found {len(images)}")
    return images


def _private(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def _restored(public_dir: Path, key_dir: Path, model) -> dict[str, np.ndarray]:
    return {
        public.stem: primis.restore(
            public.read_bytes(), (key_dir / f"{public.stem}.primiskey").read_bytes(), model
        )
        for public in sorted(public_dir.glob("*.primis"))
    }


def test_cluster_outputs_equal_ambiguates(tmp_path, client, model):
    images = _images(4)
    local = run_cli(
        "ambiguate",
        *images,
        "--model",
        "cxr",
        "--refine-steps",
        "0",
        "--public-dir",
        tmp_path / "local/public",
        "--key-dir",
        tmp_path / "local/keys",
        "--names",
        "stem",
    )
    assert local.returncode == 0, local.stderr
    public, keys = tmp_path / "dask/public", tmp_path / "dask/keys"
    result = share_many(images, public, keys, model, client=client, names="stem", refine_steps=0)
    assert (result.done, result.skipped, result.failures) == (4, 0, {})
    assert _names(public) == _names(tmp_path / "local/public")
    assert _names(keys) == _names(tmp_path / "local/keys")
    ours, theirs = _private(keys), _private(tmp_path / "local/keys")
    assert [r["input"] for r in ours] == [r["input"] for r in theirs] == [str(p) for p in images]
    for mine, other in zip(ours, theirs, strict=True):
        assert Path(mine["public"]).name == Path(other["public"]).name
        assert Path(mine["key"]).parent == keys.absolute()
    public_ids = [json.loads(line)["file_id"] for line in (public / "manifest.jsonl").open()]
    assert public_ids == [r["file_id"] for r in ours]
    expected = _restored(tmp_path / "local/public", tmp_path / "local/keys", model)
    restored = _restored(public, keys, model)
    assert restored.keys() == expected.keys()
    for stem, pixels in restored.items():
        np.testing.assert_array_equal(pixels, expected[stem])
    # each worker that shared loaded the model once
    loaded = client.run(lambda: len(__import__("primis.cluster").cluster._MODELS))
    assert set(loaded.values()) <= {0, 1} and 1 in loaded.values()
    again = share_many(images, public, keys, model, client=client, names="stem", refine_steps=0)
    assert (again.done, again.skipped) == (0, 4)
    # disambiguate on the cluster writes what it writes locally
    restore_many(sorted(public.glob("*.primis")), keys, tmp_path / "dask/out", model, client=client)
    run_cli(
        "disambiguate",
        tmp_path / "local/public",
        "--key-dir",
        tmp_path / "local/keys",
        "--model",
        "cxr",
        "--out-dir",
        tmp_path / "local/out",
        check=True,
    )
    out = sorted((tmp_path / "dask/out").iterdir())
    assert [p.name for p in out] == sorted(p.name for p in (tmp_path / "local/out").iterdir())
    for path in out:  # a worker runs one thread, the command two
        theirs = Image.open(tmp_path / "local/out" / path.name)
        assert_restored_alike(np.asarray(Image.open(path)), np.asarray(theirs), path.name)


def test_keys_for_recipients_are_wrapped_on_the_workers(tmp_path, client, model):
    """With a wrapping for a recipient, no key is in clear in the key folder (staged wrapped on
    the worker), and the recipient's identity file opens them on the cluster; a passphrase,
    which would travel to the workers, is refused."""
    from primis.keywrap import KeyWrapping, generate_identity, is_wrapped

    private, public_key = generate_identity()
    (tmp_path / "alice").write_bytes(private)
    (tmp_path / "alice.pub").write_bytes(public_key)
    images = _images(2)
    public, keys = tmp_path / "p", tmp_path / "k"
    wrapping = KeyWrapping([tmp_path / "alice.pub"])
    result = share_many(
        images, public, keys, model, client=client, wrapping=wrapping, refine_steps=0
    )
    assert result.done == 2
    written = sorted(keys.glob("*.primiskey"))
    assert len(written) == 2 and all(is_wrapped(path.read_bytes()) for path in written)
    out = tmp_path / "out"
    alice = tmp_path / "alice"
    restored = restore_many(
        sorted(public.glob("*.primis")), keys, out, model, client=client, identity=alice
    )
    assert restored.done == 2 and len(list(out.iterdir())) == 2
    with pytest.raises(primis.PrimisError, match="recipients only"):
        share_many(
            images, tmp_path / "p2", tmp_path / "k2", model, client=client,
            wrapping=KeyWrapping(passphrase="a passphrase"), refine_steps=0,
        )  # fmt: skip


def test_a_failed_file_is_reported_and_the_batch_goes_on(tmp_path, client, model):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    images = [*_images(2), bad]
    result = share_many(
        images, tmp_path / "p", tmp_path / "k", model, client=client, refine_steps=0
    )
    assert (result.done, list(result.failures)) == (2, [bad])
    assert "broken.png" in result.failures[bad]
    assert [r["input"] for r in _private(tmp_path / "k")] == [str(p) for p in images[:2]]


def test_cluster_without_the_extra_is_one_clear_line(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "distributed", None)
    image = _images(1)[0]
    result = run_cli(
        "ambiguate",
        image,
        "--model",
        tiny_model_dir,
        "--cluster",
        "local:2",
        "--public-dir",
        tmp_path / "p",
        "--key-dir",
        tmp_path / "k",
    )
    assert_clean_failure(result, "pip install 'primis[cluster]'")
    assert not (tmp_path / "p").exists()


def _assert_complete(images: list[Path], public: Path, keys: Path) -> None:
    """Every input has one whole pair and one manifest line, in input order; nothing else."""
    stems = {p.stem for p in images}
    assert {p.stem for p in public.glob("*.primis")} == stems
    assert {p.stem for p in keys.glob("*.primiskey")} == stems
    assert not list(public.glob(".*.part")) and not list(keys.glob(".*.part"))
    assert [r["input"] for r in _private(keys)] == [str(p) for p in images]
    for stem in stems:
        read_pair(
            (public / f"{stem}.primis").read_bytes(), (keys / f"{stem}.primiskey").read_bytes()
        )


def _when_pairs(keys: Path, count: int, then, timeout: float = 300) -> None:
    """Call ``then()`` once ``count`` keys are in KEY_DIR."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(list(keys.glob("*.primiskey"))) < count:
        time.sleep(0.01)
    then()


@pytest.mark.slow
def test_a_worker_killed_mid_batch_and_the_batch_completes(tmp_path, model):
    images = _images(16)
    public, keys = tmp_path / "public", tmp_path / "keys"
    with _cluster() as cluster, Client(cluster) as connected:
        victim = next(iter(connected.run(os.getpid).values()))
        killed: list[int] = []

        def kill() -> None:
            killed.append(len(list(keys.glob("*.primiskey"))))
            os.kill(victim, signal.SIGKILL)

        watcher = threading.Thread(target=_when_pairs, args=(keys, 2, kill))
        watcher.start()
        result = share_many(
            images, public, keys, model, client=connected, names="stem", refine_steps=0
        )
        watcher.join()
    assert killed and killed[0] < len(images), "the batch finished before a worker was killed"
    assert (result.done, result.skipped, result.failures) == (16, 0, {})
    _assert_complete(images, public, keys)


@pytest.mark.slow
def test_a_killed_client_and_the_rerun_completes_exactly_the_missing(tmp_path):
    images = _images(16)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image in images:
        (inputs / image.name).symlink_to(image)
    linked = sorted(inputs.iterdir())
    public, keys = tmp_path / "public", tmp_path / "keys"
    command = [
        sys.executable,
        "-m",
        "primis",
        "ambiguate",
        str(inputs),
        "--model",
        "cxr",
        "--refine-steps",
        "0",
        "--cluster",
        "local:2",
        "--names",
        "stem",
        "--public-dir",
        str(public),
        "--key-dir",
        str(keys),
    ]
    # its own session: the client, its scheduler and its workers are killed together
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _when_pairs(keys, 3, lambda: os.killpg(process.pid, signal.SIGKILL))
    finally:
        process.wait()
    time.sleep(0.5)  # the workers' processes end with their group
    before = {p.name: p.read_bytes() for p in public.glob("*.primis")}
    assert 3 <= len(before) < len(images), "the batch finished before the client was killed"
    for name in before:  # what exists is whole
        key = keys / f"{Path(name).stem}.primiskey"
        read_pair(before[name], key.read_bytes())
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    missing = len(images) - len(before)
    assert f"{missing} done, {len(before)} skipped" in rerun.stdout
    assert {name: (public / name).read_bytes() for name in before} == before  # untouched
    _assert_complete(linked, public, keys)
