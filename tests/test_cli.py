"""The command line as a user runs it: round trips, sizes, permissions and every error path."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import primis
from primis.formats import PUBLIC_MAGIC
from tests.conftest import ambiguate_cli, assert_clean_failure, run_cli, smooth_image


@pytest.fixture
def shared(tmp_path, image_files, tiny_model_dir):
    public_dir, key_dir = tmp_path / "public", tmp_path / "keys"
    run_cli(
        "ambiguate",
        "--names",
        "stem",
        *image_files,
        "--model",
        tiny_model_dir,
        "--public-dir",
        public_dir,
        "--key-dir",
        key_dir,
        check=True,
    )
    return public_dir, key_dir


def test_round_trip_keeps_size_dtype_and_range(tmp_path, image_files, tiny_model_dir, shared):
    public_dir, key_dir = shared
    out = tmp_path / "out"
    run_cli(
        "disambiguate",
        *sorted(public_dir.glob("*.primis")),
        "--model",
        tiny_model_dir,
        "--key-dir",
        key_dir,
        "--out-dir",
        out,
        check=True,
    )
    for source in image_files:
        original = np.asarray(
            Image.open(source).convert("L") if source.suffix == ".jpg" else Image.open(source)
        )
        restored = np.asarray(Image.open(out / f"{source.stem}.png"))
        assert restored.shape == original.shape
        assert restored.dtype == (np.uint16 if "deep" in source.name else np.uint8) or (
            restored.dtype == np.int32 and "deep" in source.name
        )
        assert restored.min() >= original.min() and restored.max() <= original.max()
        # The pixels written are the reconstruction of this key, value for value.
        public = public_dir / f"{source.stem}.primis"
        key = key_dir / f"{source.stem}.primiskey"
        expected = primis.restore(public.read_bytes(), key.read_bytes(), model=tiny_model_dir)
        np.testing.assert_array_equal(restored, expected)


def test_key_files_are_private_and_public_files_anonymous(image_files, shared):
    public_dir, key_dir = shared
    for source in image_files:
        key = key_dir / f"{source.stem}.primiskey"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        public = (public_dir / f"{source.stem}.primis").read_bytes()
        assert public.startswith(PUBLIC_MAGIC)
        for needle in (source.name, source.stem, str(source.parent), "patient"):
            assert needle.encode() not in public


def test_without_key_writes_the_attackers_view(tmp_path, tiny_model_dir, shared):
    public_dir, _ = shared
    out = tmp_path / "attacker"
    result = run_cli(
        "disambiguate",
        *public_dir.glob("*.primis"),
        "--model",
        tiny_model_dir,
        "--without-key",
        "--out-dir",
        out,
        check=True,
    )
    assert len(list(out.glob("*.png"))) == 3, result.stdout


def test_info_describes_files(tiny_model_dir, shared):
    public_dir, key_dir = shared
    public = json.loads(run_cli("info", public_dir / "patient_gray.primis", check=True).stdout)
    assert public["kind"] == "public" and "grid" in public
    key = json.loads(run_cli("info", key_dir / "patient_gray.primiskey", check=True).stdout)
    assert key["kind"] == "key" and key["coding"] == "enumerative"
    # The payload the public file implies for an enumerative key is this key's, byte for byte.
    assert public["enumerative_key_payload_bytes"] == key["key_payload_bytes"]
    described = json.loads(run_cli("info", tiny_model_dir, check=True).stdout)
    assert len(described["hash"]) == 64 and described["keys"] == {"coding": "enumerative"}


@pytest.mark.parametrize(
    ("options", "preset", "warning"),
    [
        ([], "strict", None),
        (["--privacy", "strict"], "strict", None),
        (["--privacy", "paper"], "paper", "warning: --privacy paper is not private: it leaks the"),
        (
            ["--privacy", "compact"],
            "compact",
            "warning: --privacy compact is not private: it links",
        ),
        (["--fill", "0.5"], "custom", "warning: --fill 0.5 with masked signs is not private"),
        (["--privacy", "paper", "--fill", "0.5"], "custom", "warning: public signs is not priv"),
        (["--privacy", "compact", "--fill", "0.25"], "custom", "it leaks the image to an"),
        (["--no-mask-signs"], "custom", "warning: public signs is not private: it links"),
    ],
)
def test_privacy_presets_are_recorded_in_both_files_and_shown(
    tmp_path, image_files, tiny_model_dir, options, preset, warning
):
    """The model's default settings are the strict preset (its secret atom order is not
    applied there); a preset changed by --fill or --mask-signs is custom; every mode but
    strict says what it leaks (linkage; the image where measured)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ambiguate_cli(tiny_model_dir, image_files[0], out=tmp_path, extra=options)
    assert result.returncode == 0, result.stderr
    assert ("warning:" in result.stderr) == (warning is not None), result.stderr
    assert warning is None or warning in result.stderr
    said = [w for w in caught if w.category.__name__ == "PrivacyWarning"]
    assert not said, [str(w.message) for w in said]  # said once, by the command line
    stem = image_files[0].stem
    public = json.loads(run_cli("info", tmp_path / "public" / f"{stem}.primis").stdout)
    key = json.loads(run_cli("info", tmp_path / "keys" / f"{stem}.primiskey").stdout)
    assert public["privacy"] == key["privacy"] == preset
    assert public["mask_signs"] == ("paper" not in options and "--no-mask-signs" not in options)
    assert not public["permuted"] or preset == "custom"
    restored = run_cli(
        "disambiguate",
        tmp_path / "public",
        "--model",
        tiny_model_dir,
        "--key-dir",
        tmp_path / "keys",
        "--out-dir",
        tmp_path / "restored",
    )
    assert restored.returncode == 0, restored.stderr


def test_the_command_line_offers_every_privacy_preset():
    from primis.cli import ambiguate, attack
    from primis.privacy import PRIVACY_MODES

    for command in (ambiguate, attack):
        option = next(p for p in command.params if p.name == "privacy")
        assert list(option.type.choices) == list(PRIVACY_MODES)


def test_an_unknown_privacy_preset_is_refused(tmp_path, image_files, tiny_model_dir):
    result = ambiguate_cli(tiny_model_dir, image_files[0], out=tmp_path, extra=["--privacy", "x"])
    assert result.returncode != 0 and "strict" in result.stderr


def test_info_and_argument_errors_answer_without_torch_or_numba(shared, tmp_path):
    public_dir, key_dir = shared
    calls = [
        ["info", public_dir / "patient_gray.primis"],
        ["info", key_dir / "patient_gray.primiskey"],
        [
            "ambiguate",
            "--names",
            "stem",
            public_dir,
            "--public-dir",
            tmp_path,
            "--key-dir",
            tmp_path,
            "--shard",
            "x",
        ],
        ["disambiguate", public_dir, "--out-dir", tmp_path],
        ["keys", "--help"],
    ]
    code = (
        "import json, sys\n"
        "from primis.cli import main\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules or 'numba' in sys.modules)\n"
    )
    argv = json.dumps([[str(a) for a in call] for call in calls])
    result = subprocess.run([sys.executable, "-c", code, argv], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == "False", result.stderr
    assert result.stderr.count("error:") == 2, result.stderr


def _disambiguate(public: Path, key_dir: Path, model: Path, out: Path):
    return run_cli("disambiguate", public, "--model", model, "--key-dir", key_dir, "--out-dir", out)


def _copy_pair(public_dir: Path, key_dir: Path, stem: str, dest: Path) -> tuple[Path, Path]:
    (dest / "keys").mkdir(parents=True, exist_ok=True)
    public = dest / f"{stem}.primis"
    key = dest / "keys" / f"{stem}.primiskey"
    public.write_bytes((public_dir / f"{stem}.primis").read_bytes())
    key.write_bytes((key_dir / f"{stem}.primiskey").read_bytes())
    return public, key


def test_wrong_key_fails_cleanly(tmp_path, tiny_model_dir, shared):
    public_dir, key_dir = shared
    public, key = _copy_pair(public_dir, key_dir, "patient_gray", tmp_path / "case")
    key.write_bytes((key_dir / "patient_deep.primiskey").read_bytes())
    result = _disambiguate(public, key.parent, tiny_model_dir, tmp_path / "o")
    assert_clean_failure(result, "another public file")
    assert not (tmp_path / "o" / "patient_gray.png").exists()


def test_key_of_an_older_public_file_fails_cleanly(tmp_path, image_files, tiny_model_dir, shared):
    public_dir, key_dir = shared
    public, key = _copy_pair(public_dir, key_dir, "patient_gray", tmp_path / "case")
    gray = next(p for p in image_files if p.stem == "patient_gray")
    newer = tmp_path / "newer"
    run_cli(
        "ambiguate",
        "--names",
        "stem",
        gray,
        "--model",
        tiny_model_dir,
        "--public-dir",
        newer,
        "--key-dir",
        newer,
        check=True,
    )
    stale = _disambiguate(newer / "patient_gray.primis", key.parent, tiny_model_dir, tmp_path / "o")
    assert_clean_failure(stale, "another public file")
    # A public file rewritten under the same file id no longer matches the key's digest.
    from primis.formats import PublicFile

    old = PublicFile.from_bytes(public.read_bytes())
    fresh = PublicFile.from_bytes((newer / "patient_gray.primis").read_bytes())
    header = fresh.header.model_copy(update={"file_id": old.header.file_id})
    public.write_bytes(PublicFile(header, fresh.vectors).to_bytes())
    assert_clean_failure(
        _disambiguate(public, key.parent, tiny_model_dir, tmp_path / "o"), "different version"
    )


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "foreign", "empty", "swap"])
@pytest.mark.parametrize("target", ["public", "key"])
def test_damaged_files_fail_cleanly(tmp_path, tiny_model_dir, shared, damage, target):
    public_dir, key_dir = shared
    public, key = _copy_pair(public_dir, key_dir, "patient_gray", tmp_path / "case")
    victim = public if target == "public" else key
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
        expected = "truncated"
    elif damage == "corrupt":
        middle = len(data) // 2
        victim.write_bytes(data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1 :])
        expected = "corrupted"
    elif damage == "foreign":
        victim.write_bytes(b"%PDF-1.7\n" + bytes(300))
        expected = "not a primis"
    elif damage == "empty":
        victim.write_bytes(b"")
        expected = "not a primis"
    else:
        other = key if target == "public" else public
        victim.write_bytes(other.read_bytes())
        expected = "not a"
    result = _disambiguate(public, key.parent, tiny_model_dir, tmp_path / "o")
    assert_clean_failure(result, expected)
    assert not list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else True


def test_missing_key_and_bad_inputs_fail_cleanly(tmp_path, tiny_model_dir, shared):
    public_dir, _ = shared
    public = next(public_dir.glob("*.primis"))
    assert_clean_failure(
        _disambiguate(public, tmp_path, tiny_model_dir, tmp_path / "o"), "no such file"
    )
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    result = run_cli(
        "ambiguate",
        "--names",
        "stem",
        not_image,
        "--model",
        tiny_model_dir,
        "--public-dir",
        tmp_path / "p",
        "--key-dir",
        tmp_path / "k",
    )
    assert_clean_failure(result, "cannot read image")
    result = run_cli(
        "ambiguate",
        "--names",
        "stem",
        not_image,
        "--model",
        tmp_path,
        "--public-dir",
        tmp_path / "p",
        "--key-dir",
        tmp_path / "k",
    )
    assert_clean_failure(result, "not a primis model")
    for missing in ("nosuchfolder", "nosuch.png"):  # a typo, whatever it names
        result = ambiguate_cli(tiny_model_dir, tmp_path / missing, out=tmp_path / "out")
        assert_clean_failure(result, f"{missing}: no such file or folder")
        assert not (tmp_path / "out").exists()  # no empty output folders


def test_a_failing_file_does_not_stop_the_batch(tmp_path, image_files, tiny_model_dir):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + bytes(20))
    result = run_cli(
        "ambiguate",
        "--names",
        "stem",
        broken,
        *image_files,
        "--model",
        tiny_model_dir,
        "--public-dir",
        tmp_path / "p",
        "--key-dir",
        tmp_path / "k",
    )
    assert_clean_failure(result, "broken.jpg")
    assert len(list((tmp_path / "p").glob("*.primis"))) == len(image_files)
    assert not list((tmp_path / "p").glob(".*part"))


def test_installed_entry_points_run(tmp_path):
    for command in ([sys.executable, "-m", "primis", "--help"], ["primis", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "primis", "info", tmp_path / "missing"],
        capture_output=True,
        text=True,
    )
    assert_clean_failure(result, "no such file")


@pytest.mark.parametrize(
    ("name", "pixels"),
    [
        ("deep.tif", (np.arange(48 * 40).reshape(48, 40) * 2).astype(np.uint16)),
        ("twelve.npy", (np.arange(33 * 35).reshape(33, 35) % 4096).astype(np.uint16)),
        ("signed.npy", (np.arange(30 * 30).reshape(30, 30) - 500).astype(np.int16)),
        ("float.npy", np.linspace(-1.5, 2.5, 40 * 24, dtype=np.float32).reshape(40, 24)),
        ("real.tif", np.linspace(-200, 800, 36 * 44, dtype=np.float32).reshape(36, 44)),
    ],
)
def test_outputs_keep_the_inputs_type_dtype_and_range(tmp_path, tiny_model_dir, name, pixels):
    import tifffile

    source = tmp_path / name
    if name.endswith(".tif"):
        tifffile.imwrite(source, pixels)
    else:
        np.save(source, pixels)
    run_cli(
        "ambiguate",
        "--names",
        "stem",
        source,
        "--model",
        tiny_model_dir,
        "--public-dir",
        tmp_path / "p",
        "--key-dir",
        tmp_path / "k",
        check=True,
    )
    run_cli(
        "disambiguate",
        tmp_path / "p" / f"{source.stem}.primis",
        "--model",
        tiny_model_dir,
        "--key-dir",
        tmp_path / "k",
        "--out-dir",
        tmp_path / "o",
        check=True,
    )
    out = tmp_path / "o" / name
    restored = tifffile.imread(out) if name.endswith(".tif") else np.load(out)
    assert restored.shape == pixels.shape and restored.dtype == pixels.dtype
    assert restored.min() >= pixels.min() and restored.max() <= pixels.max()


def test_lower_k_at_ambiguate_gives_a_smaller_key_that_still_opens(
    tmp_path, image_files, tiny_model_dir
):
    gray = next(p for p in image_files if p.stem == "patient_gray")
    sizes = {}
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        run_cli(
            "ambiguate",
            "--names",
            "stem",
            gray,
            "--model",
            tiny_model_dir,
            "--public-dir",
            out,
            "--key-dir",
            out,
            "--k",
            k,
            check=True,
        )
        header = json.loads(run_cli("info", out / "patient_gray.primis", check=True).stdout)
        assert header["k"] == k and header["ideal_key_bits"] > 0
        sizes[k] = (out / "patient_gray.primiskey").stat().st_size
        run_cli(
            "disambiguate",
            out / "patient_gray.primis",
            "--model",
            tiny_model_dir,
            "--key-dir",
            out,
            "--out-dir",
            out / "r",
            check=True,
        )
    assert sizes[1] < sizes[2]
    result = run_cli(
        "ambiguate",
        "--names",
        "stem",
        gray,
        "--model",
        tiny_model_dir,
        "--public-dir",
        tmp_path,
        "--key-dir",
        tmp_path,
        "--k",
        3,
    )
    assert_clean_failure(result, "k must lie in 1..2")


def test_model_files_keep_running_statistics_and_older_hashes(tmp_path):
    import hashlib

    import torch

    from primis.config import ObfuscationConfig
    from primis.model import SparseTernaryAutoEncoder
    from primis.modelstore import load_model, save_model
    from tests.conftest import TINY

    # A model file from before the `atom_norm`, `encoder_blocks`, `adaptive_rate` and
    # `residual_psnr` options (no such keys) loads without them and keeps the hash it had then:
    # the hash of its JSON config as written and its weights.
    old = tmp_path / "old"
    save_model(
        old,
        SparseTernaryAutoEncoder(TINY.model_copy(update={"atom_norm": False})),
        ObfuscationConfig(),
    )
    meta = json.loads((old / "model.json").read_text())
    for later in ("atom_norm", "encoder_blocks", "adaptive_rate", "residual_psnr"):
        del meta["model"][later]
    (old / "model.json").write_text(json.dumps(meta))
    weights = (old / "model.safetensors").read_bytes()
    canonical = json.dumps(meta["model"], sort_keys=True, separators=(",", ":")).encode()
    loaded = load_model(old)
    assert not loaded.network.config.atom_norm
    assert loaded.hash == hashlib.sha256(canonical + weights).hexdigest()

    network = SparseTernaryAutoEncoder(TINY.model_copy(update={"atom_norm": True}))
    network(torch.rand(4, 1, 32, 32))  # one training pass fills the running statistics
    network.eval()
    save_model(tmp_path / "new", network, ObfuscationConfig(), dtype=torch.float16)
    loaded = load_model(tmp_path / "new").network
    assert loaded.atom_norm.num_batches_tracked.item() == 1
    torch.testing.assert_close(
        loaded.atom_norm.running_var, network.atom_norm.running_var, atol=0, rtol=1e-3
    )


def test_export_half_writes_a_smaller_loadable_model(tmp_path, tiny_model_dir):
    import torch

    from primis.modelstore import load_model

    run_cli("export", tiny_model_dir, "--out", tmp_path / "half", "--half", check=True)
    full, half = load_model(tiny_model_dir), load_model(tmp_path / "half")
    assert half.hash != full.hash
    size = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert size < 0.6 * (tiny_model_dir / "model.safetensors").stat().st_size
    x = torch.rand(1, 1, 32, 32)
    code = full.network.encode(x)
    torch.testing.assert_close(
        half.network.decode(code), full.network.decode(code), atol=2e-2, rtol=0
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_option_names_where_the_model_runs(tmp_path, tiny_model_dir, image_files):
    common = [image_files[0], "--model", tiny_model_dir, "--refine-steps", "0"]
    out = ["--public-dir", tmp_path / "p", "--key-dir", tmp_path / "k"]
    assert_clean_failure(
        run_cli("ambiguate", "--names", "stem", *common, *out, "--device", "cuda"), "no CUDA"
    )
    assert not (tmp_path / "p").exists()
    run_cli("ambiguate", "--names", "stem", *common, *out, "--device", "cpu", check=True)
    assert len(list((tmp_path / "p").glob("*.primis"))) == 1


def test_rate_control_reports_what_each_file_reached(tmp_path):
    pixels = (smooth_image(160, 192, 5) * 255).astype(np.uint8)
    image = tmp_path / "chest.png"
    Image.fromarray(pixels).save(image)
    result = ambiguate_cli(
        "cxr", image, out=tmp_path / "q", extra=("--refine-steps", 2, "--quality", 30)
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("chest.png"))
    reached = float(line.split("restored ")[1].split(" dB")[0])
    assert reached >= 30 and "rate weight" in line
    restored = run_cli(
        "disambiguate",
        tmp_path / "q" / "public" / "chest.primis",
        "--key-dir",
        tmp_path / "q" / "keys",
        "--out-dir",
        tmp_path / "r",
        check=True,
    )
    assert restored.returncode == 0
    back = np.asarray(Image.open(tmp_path / "r" / "chest.png")).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((back - pixels) ** 2))
    assert psnr == pytest.approx(reached, abs=0.01)
    both = ("--quality", 30, "--key-bpp", 0.3)
    assert_clean_failure(ambiguate_cli("cxr", image, out=tmp_path / "x", extra=both), "not both")
    assert not (tmp_path / "x").exists()


def test_workers_share_a_batch_as_one_process_does(tmp_path, image_files, tiny_model_dir):
    restored = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        extra = ("--refine-steps", 0, "--workers", workers)
        result = ambiguate_cli(tiny_model_dir, *image_files, out=out, extra=extra)
        assert result.returncode == 0, result.stderr
        assert f"ambiguate: {len(image_files)} done, 0 failed" in result.stdout
        lines = (out / "keys" / "manifest.jsonl").read_text().splitlines()
        assert len(lines) == len(image_files)
        run_cli(
            "disambiguate",
            out / "public",
            "--model",
            tiny_model_dir,
            "--key-dir",
            out / "keys",
            "--out-dir",
            out / "restored",
            check=True,
        )
        restored[workers] = {p.name: p.read_bytes() for p in (out / "restored").iterdir()}
    assert restored[1] == restored[2] and len(restored[1]) == len(image_files)
