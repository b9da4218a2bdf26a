import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from primis.config import ModelConfig, ObfuscationConfig, RunConfig, TrainConfig, parse_config
from primis.data import RandomCropDataset, resolve_sources, split_paths
from primis.errors import PrimisError
from primis.model import SparseTernaryAutoEncoder
from primis.modelstore import load_model
from tests.conftest import TINY, assert_clean_failure, cxr_images, run_cli, smooth_image


@pytest.mark.slow
def test_a_few_steps_on_real_images_lower_the_loss():
    paths = cxr_images()[:16]
    torch.manual_seed(0)
    network = SparseTernaryAutoEncoder(ModelConfig(stem=4, channels=[16, 32], n=64, k=2, m=2))
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    dataset = RandomCropDataset(paths, crop=64)
    batch = torch.stack([dataset[i] for i in range(len(dataset))])

    def loss() -> torch.Tensor:
        return torch.mean((network(batch, ternary_weight=1.0) - batch) ** 2)

    with torch.no_grad():
        before = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.5 * before, (before, after)


def test_crops_have_the_requested_shape_even_from_small_images(tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray((smooth_image(20, 30) * 255).astype(np.uint8)).save(small)
    dataset = RandomCropDataset([small], crop=48)
    crop = dataset[0]
    assert crop.shape == (1, 48, 48) and crop.dtype == torch.float32
    assert crop.min() >= 0 and crop.max() <= 1


def test_radiograph_augmentations(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray((smooth_image(90, 120) * 255).astype(np.uint8)).save(path)

    def crop(seed: int, **options) -> torch.Tensor:
        torch.manual_seed(seed)
        return RandomCropDataset([path], crop=32, hflip=False, **options)[0]

    plain = crop(1)
    assert torch.allclose(crop(1, invert=1.0), 1 - plain)
    levels = torch.unique(crop(2, bit_depths=[2]))
    assert len(levels) <= 4 and torch.allclose(levels * 3, torch.round(levels * 3))
    noisy = crop(1, noise=0.2)
    assert not torch.equal(noisy, plain) and noisy.min() >= 0 and noisy.max() <= 1
    scaled = [crop(seed, scale_jitter=1.0) for seed in range(6)]
    assert all(c.shape == (1, 32, 32) and c.min() >= 0 and c.max() <= 1 for c in scaled)
    # A crop of a larger region resized down is smoother than a crop at the image's scale.
    roughness = [float(c.diff(dim=2).abs().mean()) for c in scaled]
    assert max(roughness) > 1.2 * min(roughness)


def test_split_is_reproducible_and_disjoint(tmp_path):
    paths = [tmp_path / f"{i:03d}.png" for i in range(40)]
    first = split_paths(paths, (0.8, 0.1, 0.1), seed=3)
    assert first == split_paths(list(reversed(paths)), (0.8, 0.1, 0.1), seed=3)
    assert [len(first[p]) for p in ("train", "valid", "test")] == [32, 4, 4]
    assert sorted(p for part in first.values() for p in part) == sorted(paths)


def test_train_command_writes_a_usable_run(tmp_path):
    images = _tiny_training_folder(tmp_path)
    config_file = _tiny_config_file(tmp_path, steps=6, validate_every=3, warmup_steps=2)
    run = tmp_path / "run"
    run_cli("train", "--config", config_file, "--data", images, "--out", run, check=True)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6]
    assert load_model(run).network.config == TINY
    assert (run / "config.yaml").is_file() and (run / "checkpoint" / "state.json").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # The blend to ternary began (after 25 % of the steps) from magnitudes fitted to the code.
    assert json.loads((run / "checkpoint" / "state.json").read_text())["magnitudes_fitted"]


def test_bad_configs_and_missing_data_fail_cleanly(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  n: 64\n  colour: true\n")
    result = run_cli("train", "--config", config, "--data", tmp_path, "--out", tmp_path / "r")
    assert_clean_failure(result, "model.colour")
    listing = tmp_path / "list.txt"
    listing.write_text("missing.png\n")
    result = run_cli("train", "--data", listing, "--out", tmp_path / "r")
    assert_clean_failure(result, "missing")


def test_resolve_sources_reads_lists_relative_to_the_list(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "list.txt").write_text("# comment\na/x.png\n")
    assert resolve_sources(tmp_path / "list.txt") == [tmp_path / "a" / "x.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrimisError, match="no images"):
        resolve_sources(tmp_path / "empty")


@pytest.mark.slow
def test_a_killed_run_resumes_where_its_checkpoint_stopped(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    images = _tiny_training_folder(tmp_path, count=3)
    config_file = _tiny_config_file(tmp_path, steps=100000, validate_every=1000, checkpoint_every=5)
    run = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "primis",
            "train",
            "--config",
            config_file,
            "--data",
            images,
            "--out",
            run,
            "--threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_file = run / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if state_file.is_file() and json.loads(state_file.read_text())["step"] >= 15:
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = json.loads(state_file.read_text())["step"]
    assert saved >= 15 and saved % 5 == 0
    result = run_cli("train", "--resume", run, "--max-steps", saved + 10, check=True)
    assert f"resuming {run} at step {saved}" in result.stdout
    assert f"done: step {saved + 10} " in result.stdout
    assert json.loads(state_file.read_text())["step"] == saved + 10


def test_split_command_keeps_groups_together(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for patient in range(12):
        for view in range(3):
            Image.fromarray(np.zeros((4, 4), np.uint8)).save(images / f"p{patient:02d}_v{view}.png")
    out = tmp_path / "lists"
    run_cli(
        "split",
        images,
        "--out",
        out,
        "--ratios",
        "0.5",
        "0.25",
        "0.25",
        "--group-by",
        r"^(p\d+)_",
        check=True,
    )
    parts = {name: (out / f"{name}.txt").read_text().split() for name in ("train", "valid", "test")}
    patients = {name: {Path(p).name[:3] for p in lines} for name, lines in parts.items()}
    assert not (
        patients["train"] & patients["valid"]
        or patients["train"] & patients["test"]
        or patients["valid"] & patients["test"]
    )
    assert sum(len(lines) for lines in parts.values()) == 36
    assert resolve_sources(out / "train.txt")[0].is_file()
    again = tmp_path / "again"
    run_cli(
        "split",
        images,
        "--out",
        again,
        "--ratios",
        "0.5",
        "0.25",
        "0.25",
        "--group-by",
        r"^(p\d+)_",
        check=True,
    )
    assert (again / "test.txt").read_text() == (out / "test.txt").read_text()


@pytest.mark.slow
def test_torchrun_trains_with_two_processes_on_cpu(tmp_path):
    import shutil
    import socket
    import subprocess

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    images = _tiny_training_folder(tmp_path)
    config_file = _tiny_config_file(tmp_path, steps=6, validate_every=3, checkpoint_every=3)
    run = tmp_path / "run"
    with socket.socket() as probe:  # a free port, not a fixed one another job may hold
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            "-m",
            "primis",
            "train",
            "--config",
            config_file,
            "--data",
            images,
            "--out",
            run,
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-2000:]
    assert result.stdout.count("done: step 6 ") == 2  # both ranks finish the same schedule
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 6
    assert load_model(run).network.config == TINY


def _tiny_training_folder(tmp_path: Path, count: int = 4) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(count):
        Image.fromarray((smooth_image(40, 48, i) * 255).astype(np.uint8)).save(images / f"{i}.png")
    return images


def _train_cli(config: Path, images: Path, run: Path, *extra, check: bool = False):
    """`primis train` on a folder of images, validating on its first image."""
    return run_cli(
        "train", "--config", config, "--data", images, "--valid", images / "0.png",
        "--out", run, *extra, check=check,
    )  # fmt: skip


def _tiny_config_file(tmp_path: Path, model: ModelConfig = TINY, **train) -> Path:
    settings = {"steps": 4, "batch_size": 2, "crop": 32, "validate_every": 2} | train
    config = RunConfig(model=model, train=TrainConfig(**settings))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.model_dump()))
    return path


def test_unreadable_training_images_are_reported_and_skipped_or_stop_strict_runs(tmp_path):
    images = _tiny_training_folder(tmp_path)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10))
    (images / "empty.jpg").write_bytes(b"")
    config = _tiny_config_file(tmp_path)
    result = _train_cli(config, images, tmp_path / "run", check=True)
    assert result.stderr.count("skipped:") == 2 and "broken.png" in result.stderr
    assert "2 unreadable file(s) skipped" in result.stdout
    strict = _train_cli(config, images, tmp_path / "run2", "--strict")
    assert_clean_failure(strict, "broken.png")


def test_non_finite_losses_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    images = _tiny_training_folder(tmp_path)
    config = _tiny_config_file(tmp_path, nonfinite_patience=3)

    def poisoned(self, x, **_):
        return x + self.head[0].weight.sum() * float("nan")

    monkeypatch.setattr(SparseTernaryAutoEncoder, "forward", poisoned)
    result = run_cli("train", "--config", config, "--data", images, "--out", tmp_path / "run")
    assert_clean_failure(result, "training diverged")


def test_crops_load_in_dataloader_workers(tmp_path):
    from torch.utils.data import DataLoader

    images = _tiny_training_folder(tmp_path, count=3)
    dataset = RandomCropDataset(sorted(images.glob("*.png")), crop=24, gamma_jitter=0.2)
    batches = list(DataLoader(dataset, batch_size=3, num_workers=2))
    assert batches[0].shape == (3, 1, 24, 24)


def test_shipped_configs_validate():
    from primis.config import FinetuneConfig, UtilityConfig, load_config, load_run_config

    folder = Path(__file__).resolve().parents[1] / "configs"
    configs = sorted(folder.rglob("*.yaml"))  # the design study's pilots too
    assert configs
    for path in configs:
        kind = FinetuneConfig if path.stem.endswith("-finetune") else RunConfig
        load_config(UtilityConfig if path.stem.startswith("utility") else kind, path)
    assert load_run_config(folder / "default.yaml") == RunConfig()


def test_bfloat16_autocast_only_where_it_is_native_or_asked_for():
    from primis.model import use_autocast

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert use_autocast(torch.device("cpu"), amp=True) == (native and avx512)
    assert not use_autocast(torch.device("cpu"), amp=False)
    assert use_autocast(torch.device("cuda"), amp=True)
    assert not use_autocast(torch.device("mps"), amp=True)


def test_runs_from_before_atom_norm_resume_without_it(tmp_path):
    from primis.train import load_run

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    config = RunConfig(model=TINY).model_dump()
    del config["model"]["atom_norm"]  # as written before the option existed
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_run(run).model.atom_norm is False
    config["model"]["atom_norm"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_run(run).model.atom_norm is True


@pytest.mark.parametrize("trainable", ["encoder", "decoder"])
def test_training_from_a_model_updates_only_the_trainable_part(tmp_path, tiny_model_dir, trainable):
    from primis.train import train

    images = sorted(_tiny_training_folder(tmp_path).iterdir())
    start = load_model(tiny_model_dir).network
    config = RunConfig(
        model=TINY,
        train=TrainConfig(
            steps=4,
            batch_size=2,
            crop=32,
            validate_every=2,  # steps after a validation must keep the deployed statistics
            lr=1e-2,
            warmup_steps=0,
            init=str(tiny_model_dir),
            trainable=trainable,
        ),
    )
    train(config, images, images[:1], tmp_path / "run", show_progress=False)
    trained = SparseTernaryAutoEncoder(TINY)
    trained.load_state_dict(_checkpoint_weights(tmp_path / "run"))
    names = {id(p): n for n, p in start.named_parameters()}
    frozen = start.decoder_parameters() if trainable == "encoder" else start.encoder_parameters()
    moving = start.encoder_parameters() if trainable == "encoder" else start.decoder_parameters()
    after = dict(trained.named_parameters())
    assert all(torch.equal(p, after[names[id(p)]]) for p in frozen)
    assert any(not torch.equal(p, after[names[id(p)]]) for p in moving)
    # The atom standardisation keeps the model's running statistics: the deployed code path.
    assert torch.equal(start.atom_norm.running_mean, trained.atom_norm.running_mean)


def test_a_trained_model_trained_on_whole_keeps_the_deployed_atom_statistics(
    tmp_path, tiny_model_dir
):
    from primis.train import train

    images = sorted(_tiny_training_folder(tmp_path).iterdir())
    start = load_model(tiny_model_dir).network
    train_config = TrainConfig(
        steps=4, batch_size=2, crop=32, lr=1e-2, warmup_steps=0, init=str(tiny_model_dir)
    )
    for deployed in (True, False):
        run = tmp_path / f"run-{deployed}"
        config = RunConfig(
            model=TINY, train=train_config.model_copy(update={"deployed_atom_norm": deployed})
        )
        train(config, images, images[:1], run, show_progress=False)
        trained = SparseTernaryAutoEncoder(TINY)
        trained.load_state_dict(_checkpoint_weights(run))
        same = torch.equal(start.atom_norm.running_mean, trained.atom_norm.running_mean)
        assert same == deployed  # batch statistics move them only when not deployed
        assert not torch.equal(start.decoder_parameters()[0], trained.decoder_parameters()[0])


def test_encoder_blocks_added_to_a_trained_model_start_as_the_identity(tmp_path, tiny_model_dir):
    from primis.modelstore import save_model
    from primis.train import _load_initial_weights

    start = load_model(tiny_model_dir).network.eval()
    deeper = SparseTernaryAutoEncoder(TINY.model_copy(update={"encoder_blocks": 2}))
    _load_initial_weights(deeper, str(tiny_model_dir))
    deeper.eval()
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(deeper.analysis(x), start.analysis(x))
    assert len(deeper.encoder_stages[-1]) == len(start.encoder_stages[-1]) + 2
    save_model(tmp_path / "deeper", deeper, ObfuscationConfig())
    with pytest.raises(PrimisError, match="differs"):  # blocks may be added, not removed
        _load_initial_weights(start, str(tmp_path / "deeper"))


def test_a_trained_model_given_the_adaptive_rate_starts_coding_as_before(tmp_path, tiny_model_dir):
    from primis.modelstore import save_model
    from primis.train import _load_initial_weights

    start = load_model(tiny_model_dir).network.eval()
    adaptive = SparseTernaryAutoEncoder(TINY.model_copy(update={"adaptive_rate": True}))
    _load_initial_weights(adaptive, str(tiny_model_dir))
    adaptive.eval()
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z_start, z_adaptive = start.analysis(x), adaptive.analysis(x)
        torch.testing.assert_close(z_adaptive, z_start)
        k = TINY.k
        assert torch.equal(adaptive.ternarize(z_adaptive, k), start.ternarize(z_start, k))
    save_model(tmp_path / "adaptive", adaptive, ObfuscationConfig())
    with pytest.raises(PrimisError, match="cannot lose its thresholds"):
        _load_initial_weights(start, str(tmp_path / "adaptive"))


def test_a_trained_model_may_grow_more_pairs_per_vector_but_not_fewer(tmp_path, tiny_model_dir):
    from primis.modelstore import save_model
    from primis.train import _load_initial_weights

    start = load_model(tiny_model_dir).network.eval()
    wider = SparseTernaryAutoEncoder(TINY.model_copy(update={"k": TINY.k + 2}))
    _load_initial_weights(wider, str(tiny_model_dir))
    wider.eval()
    for name, tensor in start.state_dict().items():  # every weight carried over as it was
        assert torch.equal(wider.state_dict()[name], tensor), name
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pairs = (wider.ternarize(wider.analysis(x), wider.config.k) == 1).sum(2)
    assert torch.all(pairs == TINY.k + 2)
    save_model(tmp_path / "wider", wider, ObfuscationConfig())
    with pytest.raises(PrimisError, match="differs"):
        _load_initial_weights(start, str(tmp_path / "wider"))


def test_an_init_model_of_another_shape_is_refused(tmp_path, tiny_model_dir):
    images = _tiny_training_folder(tmp_path)
    config = RunConfig(
        model=TINY.model_copy(update={"n": 64}),
        train=TrainConfig(steps=2, batch_size=2, crop=32, init=str(tiny_model_dir)),
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.model_dump()))
    result = _train_cli(path, images, tmp_path / "run")
    assert_clean_failure(result, "differs from the run's model section")


def _checkpoint_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "checkpoint" / "model.safetensors")


def test_machine_info_names_the_cpu_its_flags_and_the_numeric_type_used():
    from primis.model import use_autocast
    from primis.report import SPEED_FLAGS, describe_machine, machine_info

    info = machine_info()
    assert info["cpu"] and set(info["flags"]) <= set(SPEED_FLAGS)
    assert info["threads"] == torch.get_num_threads()
    native = use_autocast(torch.device("cpu"), amp=True)
    assert info["dtype"] == ("bfloat16 autocast" if native else "float32")
    assert info["dtype"] in describe_machine(info) and info["cpu"] in describe_machine(info)


ADAPTIVE = TINY.model_copy(update={"adaptive_rate": True})


def test_a_rate_weight_makes_an_adaptive_model_keep_fewer_pairs(tmp_path):
    """The rate term acts: a few training steps under a large weight drop pairs (the same steps
    without it keep them), and validation reports the strict-mode bits of the counts."""
    from primis.io.images import read_image
    from primis.keys.enumerative import strict_key_bits
    from primis.obfuscation import code_to_vectors

    images = _tiny_training_folder(tmp_path)
    crops = [smooth_image(32, 32, seed) for seed in range(4)]
    batch = torch.from_numpy(np.stack(crops).astype(np.float32))[:, None]
    bpp = {}
    for weight in (0.0, 1000.0):
        config = _tiny_config_file(
            tmp_path, ADAPTIVE, steps=15, lr=0.03, warmup_steps=0, rate_weight=weight, batch_size=4,
            validate_every=15,
        )  # fmt: skip
        run = tmp_path / f"run-{weight}"
        _train_cli(config, images, run, check=True)
        network = load_model(run).network
        [record] = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        image = read_image(images / "0.png")[0]  # 40 x 48: whole code cells
        code = network.encode(torch.from_numpy(image)[None, None])
        assert record["key_bpp"] == round(strict_key_bits(code_to_vectors(code)) / image.size, 4)
        with torch.no_grad():
            _, bits = network.train()(batch, with_bits=True)  # as the training steps saw it
        bpp[weight] = float(bits.sum()) / batch.numel()
    full = 2 * 17.72 / 64  # every pair kept: 2 maps of 32 atoms, 2 pairs each, per 8x8 pixels
    assert bpp[0.0] > 0.98 * full and bpp[1000.0] < 0.9 * bpp[0.0], bpp


def test_threshold_lr_scale_makes_the_thresholds_move_that_much_faster(tmp_path):
    """A scaled threshold learning rate moves an adaptive model's thresholds further in the same
    steps (Adam's steps are about lr each), the rest of the optimisation unchanged; the run
    resumes with its two parameter groups."""
    images = _tiny_training_folder(tmp_path)
    moved = {}
    for scale in (1.0, 20.0):
        config = _tiny_config_file(
            tmp_path, ADAPTIVE, steps=6, lr=0.001, warmup_steps=0, rate_weight=10.0,
            threshold_lr_scale=scale, validate_every=6, checkpoint_every=3,
        )  # fmt: skip
        run = tmp_path / f"run-{scale}"
        _train_cli(config, images, run, check=True)
        moved[scale] = float(load_model(run).network.thresholds.abs().max())
    assert moved[1.0] <= 6 * 0.001 * 1.01 and moved[20.0] > 5 * moved[1.0], moved
    run_cli("train", "--resume", tmp_path / "run-20.0", "--max-steps", 8, check=True)


def test_a_rate_weight_needs_an_adaptive_model_and_an_adaptive_model_the_strict_mode():
    with pytest.raises(PrimisError, match=r"rate_weight > 0 needs model\.adaptive_rate"):
        parse_config(RunConfig, {"train": {"rate_weight": 0.1}}, "run.yaml")
    adaptive = {"model": {"adaptive_rate": True}, "train": {"rate_weight": 0.1}}
    assert parse_config(RunConfig, adaptive, "run.yaml").model.adaptive_rate
    with pytest.raises(PrimisError, match="shares only in the strict mode"):
        parse_config(RunConfig, adaptive | {"obfuscation": {"fill": 0.5}}, "run.yaml")


def test_runs_from_before_adaptive_rates_resume_with_a_fixed_rate(tmp_path):
    """(Model files: `test_model_files_keep_running_statistics_and_older_hashes`.)"""
    from primis.train import load_run

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    config = RunConfig(model=TINY).model_dump()
    del config["model"]["adaptive_rate"], config["train"]["rate_weight"]  # as written before
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert load_run(run) == RunConfig(model=TINY)
    fixed, adaptive = (SparseTernaryAutoEncoder(c).state_dict() for c in (TINY, ADAPTIVE))
    assert set(adaptive) - set(fixed) == {"thresholds"}  # fixed-rate weight files unchanged


def test_keep_best_weighs_the_key_under_a_rate_weight(tmp_path):
    """Without a rate weight the best model is the one with the highest validation PSNR; with
    one, a model whose key is much smaller can win at a slightly lower PSNR (the objective)."""
    from primis.train import RunLog, Validation

    larger_key = Validation(30.0, 0.9, 0.40, np.zeros((1, 1)))
    smaller_key = Validation(29.5, 0.9, 0.20, np.zeros((1, 1)))
    plain = RunLog(tmp_path / "plain", ObfuscationConfig(), [])
    weighted = RunLog(tmp_path / "weighted", ObfuscationConfig(), [], rate_weight=0.001)
    assert plain.score(larger_key) == 30.0 > plain.score(smaller_key)
    assert weighted.score(smaller_key) > weighted.score(larger_key)
    plain.close()
    weighted.close()
