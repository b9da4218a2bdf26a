"""Seeded fuzzing of everything PRIMIS reads: public files, keys, wrapped keys, input images.

Cases are mutations of valid files: raw byte damage (bit flips, truncation, insertion,
deletion, extreme integers), and structured edits with the checksum recomputed (header fields
set to huge numbers, wrong types, deep nesting; key payload bits). Most structured edits of a
public file or a key are then resealed (`_reseal`: the pair bound to each other again as
`formats.seal_pair` binds it), so that the hostile content reaches the header checks and
decoders instead of stopping at the binding. Each case runs the
`primis` command line in one worker process under a 2 GB address-space limit
(`resource.setrlimit`) and a 30 s alarm; a case that crashes or hangs the worker fails and the
worker restarts after it. Every case must end with exit 0 or a one-line `error:` (no
traceback, no "unexpected" error), and a case whose input was damaged or edited must write no
output unless the damage left the content the same (then the output equals the reference).

CI runs PRIMIS_FUZZ_CASES=300 cases (the default) with seed PRIMIS_FUZZ_SEED=0; set them to
run longer, e.g. `PRIMIS_FUZZ_CASES=5000 PRIMIS_FUZZ_SEED=7 python -m pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import selectors
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from primis import keywrap
from tests.conftest import run_cli, smooth_image
from tests.test_dicom import _write_dicom

MEMORY = 2 << 30
CASE_SECONDS = 30
ROOT = Path(__file__).resolve().parents[1]
PASSPHRASE = "fuzz passphrase"
EXTREMES = [0, 1, -1, 2**31, 2**32 + 1, 2**63, 10**30, 1e308, -1e308, "1e999", 0.5]
RESEALED = ("public edited", "public huge", "key edited", "key payload")
# What the binding of a pair says when an edit was not resealed (see `formats.open_pair`).
BINDING_REFUSALS = ("the key was edited", "made for a different version", "checksum mismatch")
ODD_VALUES = [None, True, "x" * 5000, [], {}, [[[[1]]]], {"a": {"b": 1}}, "", "\u0000"]


def _limits() -> None:
    """Run in the worker before it starts: the memory cap of every case."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def worker(cases: str) -> None:
    """Run the cases listed as JSON lines in the file ``cases``; report 'start ID' and
    'done ID RESULT' on stdout."""
    import signal

    from primis.cli import main  # noqa: F401 (imported once, before the first case)

    def timeout(*_):
        raise TimeoutError(f"case ran over {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, timeout)
    os.environ["PRIMIS_PASSPHRASE"] = PASSPHRASE
    for line in Path(cases).read_text().splitlines():
        case = json.loads(line)
        print(f"start {case['id']}", flush=True)
        signal.alarm(CASE_SECONDS)
        result = run_cli(*case["args"])
        signal.alarm(0)
        outputs = sorted(p.name for p in Path(case["out"]).glob("*")) if case["out"] else []
        report = {"rc": result.returncode, "stderr": result.stderr[-3000:], "outputs": outputs}
        print(f"done {case['id']} {json.dumps(report)}", flush=True)


def _run_worker(cases: list[dict], folder: Path) -> dict[int, dict]:
    """Results by case id; a case that kills or stalls the worker is reported as such."""
    results: dict[int, dict] = {}
    pending = list(cases)
    listing = folder / "cases.jsonl"
    while pending:
        listing.write_text("".join(json.dumps(c) + "\n" for c in pending))
        process = subprocess.Popen(
            [sys.executable, "-c", f"from tests.test_fuzz import worker; worker({str(listing)!r})"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            preexec_fn=_limits,
        )
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        current = None
        while True:
            if not selector.select(timeout=CASE_SECONDS + 60 if current is not None else 300):
                process.kill()
                break
            line = process.stdout.readline()
            if not line:
                break
            word, case_id, *rest = line.rstrip("\n").split(" ", 2)
            if word == "start":
                current = int(case_id)
            elif word == "done":
                results[int(case_id)] = json.loads(rest[0])
                current = None
        process.wait()
        if current is not None:
            results[current] = {"rc": process.returncode, "stderr": "worker died", "outputs": []}
        pending = [c for c in pending if c["id"] not in results]
    return results


# Mutations -----------------------------------------------------------------------------------


def _damage(data: bytes, rng: random.Random) -> bytes:
    """Raw damage, different from the input."""
    out = bytearray(data)
    kind = rng.choice(["flip", "bytes", "truncate", "insert", "delete", "int", "repeat"])
    at = rng.randrange(len(out))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            spot = rng.randrange(len(out))
            out[spot] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        out[at : at + 4] = bytes(rng.randrange(256) for _ in range(4))
    elif kind == "truncate":
        del out[at:]
    elif kind == "insert":
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "delete":
        del out[at : at + rng.randint(1, 64)]
    elif kind == "int":
        out[at : at + 4] = struct.pack(">I", rng.choice([0, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 24]))
    else:
        out[at:at] = bytes(out[at : at + 256]) * rng.randint(2, 50)
    if bytes(out) == data:
        out.append(0)
    return bytes(out)


def _container_parts(data: bytes) -> tuple[bytes, dict, bytes]:
    """(prefix, header, payload) of a PRIMIS file."""
    (length,) = struct.unpack_from(">I", data, 10)
    return data[:10], json.loads(data[14 : 14 + length]), data[18 + length : -32]


def _container(prefix: bytes, header: object, payload: bytes) -> bytes:
    """A PRIMIS file with any header value and a correct checksum."""
    text = json.dumps(header).replace("Infinity", "1e999").encode()
    body = prefix + struct.pack(">I", len(text)) + text + struct.pack(">I", len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def _reseal(public: bytes, key: bytes) -> tuple[bytes, bytes]:
    """The pair bound again after an edit, as `formats.seal_pair` binds it: the key's
    commitment into the public header, the public file's digest into the key, checksums
    recomputed; the readers then meet the edited content itself, not a digest mismatch. A key
    whose header no longer parses cannot be committed to; it is bound to the public file
    only."""
    from primis.errors import PrimisError
    from primis.formats import KeyFile

    prefix, header, payload = _container_parts(public)
    try:
        commitment = KeyFile.from_bytes(key).commitment()
    except PrimisError:
        commitment = None
    if commitment is not None and isinstance(header, dict):
        public = _container(prefix, {**header, "key_commitment": commitment}, payload)
    key_prefix, key_header, key_payload = _container_parts(key)
    if isinstance(key_header, dict):
        key_header = {**key_header, "public_sha256": hashlib.sha256(public).hexdigest()}
        key = _container(key_prefix, key_header, key_payload)
    return public, key


def _odd(rng: random.Random) -> object:
    value = rng.choice(EXTREMES + ODD_VALUES)
    return float(value) if value == "1e999" else value


def _edit_header(data: bytes, rng: random.Random) -> bytes:
    """A header field set to an extreme or odd value, or the header replaced, checksum fixed."""
    prefix, header, payload = _container_parts(data)
    choice = rng.random()
    if choice < 0.1:
        header = _odd(rng)
    elif choice < 0.2:
        header[rng.choice(["extra", "kind"])] = _odd(rng)
    else:
        field = rng.choice(sorted(header))
        value = header[field]
        if isinstance(value, list) and value and rng.random() < 0.5:
            value = list(value)
            value[rng.randrange(len(value))] = _odd(rng)
        elif isinstance(value, dict) and value and rng.random() < 0.7:
            value = dict(value)
            value[rng.choice(sorted(value))] = _odd(rng)
        else:
            value = _odd(rng)
        header[field] = value
    return _container(prefix, header, payload)


def _huge_geometry(data: bytes, rng: random.Random) -> bytes:
    """A public file that declares a huge code over a small, highly compressible payload."""
    prefix, header, _ = _container_parts(data)
    header["grid"] = [rng.choice([1 << 10, 1 << 12, 1 << 16, 3000]) for _ in range(2)]
    header["n"] = rng.choice([2, 4, 32])
    header.update({"k": 1, "noise": 0, "m": rng.choice([1, 2, 64])})
    payload = zlib.compress(bytes([0xFF, 0xAA]) * rng.choice([1 << 10, 1 << 20]), 9)
    return _container(prefix, header, payload)


def _flip_payload(data: bytes, rng: random.Random) -> bytes:
    prefix, header, payload = _container_parts(data)
    payload = bytearray(payload)
    bit = rng.randrange(8 * len(payload))
    payload[bit // 8] ^= 1 << (bit % 8)
    return _container(prefix, header, bytes(payload))


def _edit_wrapped(data: bytes, rng: random.Random) -> bytes:
    """A wrapped key whose header is edited (the AEAD is left as it was)."""
    (length,) = struct.unpack_from(">I", data, 10)
    header = json.loads(data[14 : 14 + length])
    slots = header["slots"]
    choice = rng.random()
    if choice < 0.2:
        header["slots"] = _odd(rng)
    elif choice < 0.35:
        header["slots"] = slots * rng.choice([2, 70, 300])
    elif choice < 0.55:
        scrypt = next(s for s in slots if s["type"] == "scrypt")
        scrypt["params"] = {p: rng.choice([1, 2**20, 2**24, 3, 1 << 40]) for p in "nrp"}
    else:
        slot = rng.choice(slots)
        slot[rng.choice(sorted(slot))] = _odd(rng)
    text = json.dumps(header).encode()
    return data[:10] + struct.pack(">I", len(text)) + text + data[14 + length :]


def _image_header(path: Path, data: bytes, rng: random.Random) -> bytes:
    """An image whose header declares other (often huge) dimensions."""
    size = rng.choice([0, 1, 40000, 1 << 20, 0xFFFFFFFF])
    if path.suffix == ".png":
        out = bytearray(data)
        out[16:24] = struct.pack(">II", size, rng.choice([size, 3]))
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        return bytes(out)
    if path.suffix == ".npy":
        return data.replace(b"(24, 20)", f"({size}, {size})".encode()[:8].ljust(8))
    if path.suffix == ".dcm":
        out = bytearray(data)
        for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00"):  # Rows, Columns (US)
            at = out.find(tag)
            if at >= 0:
                out[at + 8 : at + 10] = struct.pack("<H", min(size, 0xFFFF))
        return bytes(out)
    return _damage(data, rng)


# The suite -----------------------------------------------------------------------------------


def _base_files(folder: Path, model: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    pixels = (smooth_image(24, 20, 1) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / "scan.png")
    Image.fromarray(pixels).save(folder / "scan.jpg", quality=90)
    tifffile.imwrite(folder / "scan.tif", pixels.astype(np.uint16) * 64, compression="zlib")
    np.save(folder / "scan.npy", pixels.astype(np.float32))
    _write_dicom(folder / "scan.dcm", pixels.astype(np.uint16) * 16, "MONOCHROME2")
    run_cli(
        "ambiguate", "--names", "stem", folder / "scan.png", "--model", model,
        "--public-dir", folder, "--key-dir", folder, "--refine-steps", "0", check=True,
    )  # fmt: skip
    run_cli("keys", "gen", "--out", folder / "alice", check=True)
    wrapped = folder / "wrapped.primiskey"
    wrapped.write_bytes((folder / "scan.primiskey").read_bytes())
    os.environ["PRIMIS_PASSPHRASE"] = PASSPHRASE
    written = keywrap.SCRYPT
    keywrap.SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # a file's own parameters open it: fast cases
    try:
        run_cli("keys", "wrap", wrapped, "--to", folder / "alice.pub", "--passphrase", check=True)
    finally:
        keywrap.SCRYPT = written
        del os.environ["PRIMIS_PASSPHRASE"]
    return {p.name: p for p in folder.iterdir()}


def _cases(base: dict[str, Path], model: Path, work: Path, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    public, key = base["scan.primis"].read_bytes(), base["scan.primiskey"].read_bytes()
    wrapped = base["wrapped.primiskey"].read_bytes()
    images = [base[name] for name in ("scan.png", "scan.jpg", "scan.tif", "scan.npy", "scan.dcm")]
    kinds = {
        "public damaged": 3,
        "public edited": 3,
        "public huge": 1,
        "key damaged": 2,
        "key edited": 3,
        "key payload": 2,
        "wrapped damaged": 1,
        "wrapped edited": 2,
        "image": 4,
        "info": 2,
    }
    names, weights = zip(*kinds.items(), strict=True)
    cases = []
    for index in range(count):
        kind = rng.choices(names, weights)[0]
        folder = work / f"case{index}"
        (folder / "keys").mkdir(parents=True)
        out = folder / "out"
        case_public, case_key, strict = public, key, True
        disambiguate = ["disambiguate", folder / "scan.primis", "--model", model,
                        "--key-dir", folder / "keys", "--out-dir", out]  # fmt: skip
        if kind == "public damaged":
            case_public = _damage(public, rng)
        elif kind == "public edited":
            case_public = _edit_header(public, rng)
        elif kind == "public huge":
            case_public = _huge_geometry(public, rng)
        elif kind == "key damaged":
            case_key = _damage(key, rng)
        elif kind == "key edited":
            case_key = _edit_header(key, rng)
        elif kind == "key payload":
            case_key = _flip_payload(key, rng)
        elif kind.startswith("wrapped"):
            case_key = (_damage if kind == "wrapped damaged" else _edit_wrapped)(wrapped, rng)
            disambiguate += rng.choice([["--passphrase"], ["--identity", base["alice"]]])
        resealed = False
        if kind.startswith("public") and rng.random() < 0.4:
            disambiguate = [*disambiguate[:4], "--without-key", *disambiguate[6:]]
            strict = kind == "public damaged"  # an edited public file is just another file
        elif kind in RESEALED and rng.random() < 0.8:  # past the binding, to the decoders
            case_public, case_key = _reseal(case_public, case_key)
            resealed, strict = True, False  # a resealed edit is another, consistent pair
        (folder / "scan.primis").write_bytes(case_public)
        (folder / "keys" / "scan.primiskey").write_bytes(case_key)
        args = disambiguate
        if kind == "image":
            source = rng.choice(images)
            data = source.read_bytes()
            if rng.random() < 0.4:
                (folder / source.name).write_bytes(_image_header(source, data, rng))
            else:
                (folder / source.name).write_bytes(_damage(data, rng))
            args = ["ambiguate", "--names", "stem", folder / source.name, "--model", model,
                    "--public-dir", out, "--key-dir", folder / "keys",
                    "--refine-steps", "0"]  # fmt: skip
            strict = False  # a damaged image may still be a valid image
        elif kind == "info":
            victim = rng.choice([public, key, wrapped])
            mutated = rng.choice([_damage, _edit_header])(victim, rng)
            if victim is wrapped:
                mutated = _edit_wrapped(victim, rng)
            (folder / "file").write_bytes(mutated)
            args, out, strict = ["info", folder / "file"], None, False
        cases.append(
            {"id": index, "kind": kind, "args": [str(a) for a in args],
             "out": str(out) if out else None, "strict": strict, "resealed": resealed}
        )  # fmt: skip
    return cases


def test_fuzz_every_reader(tmp_path, tiny_model_dir):
    count = int(os.environ.get("PRIMIS_FUZZ_CASES", "300"))
    seed = int(os.environ.get("PRIMIS_FUZZ_SEED", "0"))
    base = _base_files(tmp_path / "base", tiny_model_dir)
    reference = tmp_path / "reference"
    run_cli("disambiguate", base["scan.primis"], "--model", tiny_model_dir, "--key-dir",
            base["scan.primis"].parent, "--out-dir", reference, check=True)  # fmt: skip
    expected = (reference / "scan.png").read_bytes()
    cases = _cases(base, tiny_model_dir, tmp_path / "cases", count, seed)
    results = _run_worker(cases, tmp_path)
    problems = []
    for case in cases:
        result = results[case["id"]]
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        clean = result["rc"] in (0, 1) and all(line.startswith("error:") for line in lines)
        clean = clean and not any("unexpected" in line for line in lines)
        wrote = [name for name in result["outputs"] if not name.startswith(".")]
        same = wrote == ["scan.png"] and (Path(case["out"]) / "scan.png").read_bytes() == expected
        if not clean or (case["strict"] and wrote and not same):
            problems.append(f"case {case['id']} ({case['kind']}): {result} {case['args']}")
        if case["resealed"] and any(text in result["stderr"] for text in BINDING_REFUSALS):
            problems.append(f"case {case['id']} ({case['kind']}): not resealed: {result}")
    assert not problems, f"{len(problems)} of {len(cases)} cases failed:\n" + "\n".join(
        problems[:20]
    )
    assert len(results) == count
    kinds = {case["kind"] for case in cases}
    assert len(kinds) == 10 or count < 100, kinds
    resealed = [case for case in cases if case["resealed"]]
    assert len(resealed) >= count // 5, "too few hostile pairs got past the binding"
