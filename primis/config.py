"""Validated configuration: model capacity, obfuscation and training, loaded from YAML or JSON.

Unknown keys are rejected, so a typo in a configuration file is an error, not a silent default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from primis.errors import PrimisError

# Adam steps that improve each image's code before it is shared (`SparseTernaryAutoEncoder.refine`,
# `primis ambiguate --refine-steps`). None by default: the bundled model's decoder is trained on
# its encoder's own codes, and each step costs about as much as the encoder (MODEL_CARD.md has
# what steps buy).
REFINE_STEPS = 0
# A refined setting that benchmarks set beside the default (where the gain per step flattens).
REFINED_STEPS = 50


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    """Capacity of the Sparse Ternary AutoEncoder.

    The code grid has one position per ``downsampling x downsampling`` pixels, where
    ``downsampling = stem * 2 ** (len(channels) - 1)``; at each position there are ``m`` code
    vectors of length ``n`` with ``k`` entries +1 and ``k`` entries -1 (with ``adaptive_rate``,
    s <= k of each, s chosen per vector).
    """

    stem: int = Field(4, ge=1, le=16, description="pixel-unshuffle factor of the first layer")
    channels: list[int] = Field([32, 64, 128], min_length=1, max_length=6)
    blocks: int = Field(1, ge=0, le=8, description="residual blocks per scale")
    encoder_blocks: int = Field(
        0,
        ge=0,
        le=8,
        description="extra residual blocks at the encoder's deepest scale: a stronger encoder for"
        " the same decoder (added to a trained model by train.init, they start as the identity)",
    )
    n: int = Field(256, ge=4, le=4096, description="length of each code vector")
    k: int = Field(4, ge=1, description="non-zeros of each sign per code vector")
    m: int = Field(2, ge=1, le=64, description="number of code maps")
    projection_kernel: int = Field(1, ge=1, le=7)
    atom_norm: bool = Field(
        True,
        description="standardise each atom's score over the batch before selection (batch"
        " statistics in training, running ones at inference), against collapse onto few atoms",
    )
    adaptive_rate: bool = Field(
        False,
        description="each vector keeps only its pairs stronger than a learned threshold per code"
        " map (s <= k pairs, fewer key bits where the image is flat); shares in the strict mode",
    )
    residual_psnr: float | None = Field(
        None,
        gt=0,
        le=100,
        description="each key also carries what the network leaves of the image, coded with JPEG"
        " 2000 up to this PSNR in dB over the image's own range (`primis.fidelity`): a"
        " high-fidelity layer in the key alone (None: the key holds the code alone)",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if 2 * self.k > self.n:
            raise ValueError(f"2*k ({2 * self.k}) must not exceed n ({self.n})")
        if self.projection_kernel % 2 == 0:
            raise ValueError("projection_kernel must be odd")
        if any(c < 1 for c in self.channels):
            raise ValueError("channels must be positive")
        return self

    @property
    def downsampling(self) -> int:
        return self.stem * 2 ** (len(self.channels) - 1)


# Why an adaptive-rate model refuses every mode but the strict one (`obfuscation.reveals_nothing`).
ADAPTIVE_STRICT_ONLY = (
    "an adaptive-rate model shares only in the strict mode (fill 1 with masked signs, "
    "--privacy strict): in any other mode the public vector would show each vector's count; "
    "the other modes need a fixed-rate model, such as --model cxr-v3"
)

# Model options added after the first release, with the value that models and runs saved before
# them have: a saved configuration without the option gets that value (`with_later_options`).
LATER_MODEL_OPTIONS = {
    "atom_norm": False,
    "encoder_blocks": 0,
    "adaptive_rate": False,
    "residual_psnr": None,
}


def with_later_options(data: object) -> object:
    """A saved file's data (model section under "model"), completed with the values older files
    imply; anything else comes back unchanged, for validation to report."""
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return data | {"model": LATER_MODEL_OPTIONS | data["model"]}
    return data


class ObfuscationConfig(Strict):
    """How public code vectors hide the true support.

    ``fill`` is the fraction of the n-2k zero entries turned into noise (1.0: every entry of the
    public vector is non-zero). With ``mask_signs`` the public sign of each true entry is a fresh
    random bit, so the public vector is independent of the image; the key then names the sign of
    each true entry (exactly the ideal bit count of a ternary vector). Without it the true entries
    keep their signs in public and the key is smaller by about 2k bits per vector. With
    ``permute_atoms`` each file shows every map's atoms in a secret random order, so the
    model's preference for some atoms does not point at the true entries.
    """

    fill: float = Field(1.0, ge=0.0, le=1.0)
    mask_signs: bool = True
    permute_atoms: bool = Field(
        True, description="shuffle each map's atom order per file (log2(n!) key bits per map)"
    )
    pad_size_class: bool = Field(
        False,
        description="strict only (fill 1, masked signs): the public grid is the image's padded "
        "with noise to a coarse size class (the model's granularity times 2^i or 3*2^(i-1) "
        "per side); the key, not the header, holds the size; no key bits, more public bytes",
    )

    @model_validator(mode="after")
    def _padding(self) -> ObfuscationConfig:
        if self.pad_size_class and not (self.fill == 1.0 and self.mask_signs):
            raise ValueError(
                "pad_size_class needs fill 1 and masked signs (the strict mode), where the "
                "public vectors are independent of the image"
            )
        return self


class TrainConfig(Strict):
    """A training run: optimisation, data sampling and the ternary annealing schedule."""

    steps: int = Field(6000, ge=1)
    batch_size: int = Field(16, ge=1)
    crop: int = Field(128, ge=16)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.02, gt=0, le=1)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    real_steps: float = Field(0.0, ge=0, le=1, description="fraction of steps on real values")
    anneal_steps: float = Field(0.0, ge=0, le=1, description="fraction spent blending to ternary")
    straight_through: float = Field(
        1.0, ge=0, le=1, description="share of the decoder-input gradient passed to every score"
    )
    rate_weight: float = Field(
        0.0,
        ge=0,
        description="lambda of the loss MSE + lambda * key bits per pixel (adaptive-rate models)",
    )
    threshold_lr_scale: float = Field(
        1.0,
        ge=1,
        description="an adaptive-rate model's thresholds learn this many times faster than the"
        " other weights (Adam moves a parameter by about lr per step; a threshold must cross"
        " the scale of the pair strengths)",
    )
    map_dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="chance to drop each code map (one always kept), for keys "
        "that open only some maps",
    )
    k_choices: list[int] = Field(default_factory=list, description="k values sampled per step")
    validate_every: int = Field(200, ge=1, description="validate, log images, keep best")
    checkpoint_every: int = Field(100, ge=1, description="save the resumable state")
    max_minutes: float | None = Field(None, gt=0, description="time budget; the schedule fits it")
    hflip: bool = True
    gamma_jitter: float = Field(0.0, ge=0, lt=1, description="random gamma in [1-g, 1+g]")
    scale_jitter: float = Field(
        0.0, ge=0, le=2, description="crops of crop * 2**u pixels, u in [-s, s], resized to crop"
    )
    invert: float = Field(0.0, ge=0, le=1, description="chance to invert a crop (MONOCHROME1)")
    noise: float = Field(
        0.0, ge=0, lt=0.5, description="Gaussian noise of a random std in [0, noise] per crop"
    )
    bit_depths: list[int] = Field(
        default_factory=list, description="quantise each crop to one of these bit depths"
    )
    workers: int = Field(0, ge=0)
    nonfinite_patience: int = Field(10, ge=1, description="non-finite steps in a row before stop")
    amp: bool = Field(
        True, description="bfloat16 autocast on CUDA and on CPUs with native bfloat16"
    )
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    init: str | None = Field(
        None,
        description="start from this trained model (run directory or bundled name) instead of"
        " random weights; the model section must equal its configuration",
    )
    deployed_atom_norm: bool = Field(
        False,
        description="the atom standardisation uses the model's running statistics, as deployed,"
        " and keeps them, even when everything trains (to go on training a trained model on"
        " the code path sharing computes); always so when only one half trains",
    )
    trainable: Literal["all", "encoder", "decoder"] = Field(
        "all",
        description="parameters the optimizer updates: 'encoder' trains the analysis side"
        " against a fixed decoder, so its one-pass code approaches the refined one",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if any(not 1 <= bits <= 16 for bits in self.bit_depths):
            raise ValueError("bit_depths must lie in 1..16")
        if self.real_steps + self.anneal_steps > 1:
            raise ValueError("real_steps + anneal_steps must not exceed 1")
        return self


class FinetuneConfig(Strict):
    """Adapting a trained model's decoder to refined codes (`primis finetune`)."""

    refine_steps: int = Field(25, ge=1, description="refinement steps per code (as ambiguate)")
    rounds: int = Field(1, ge=1, description="refine the training codes anew for each round")
    steps: int = Field(4000, ge=1, description="decoder training steps per round")
    max_minutes: float | None = Field(None, gt=0, description="time budget of all rounds")
    batch_size: int = Field(16, ge=1)
    crop: int = Field(128, ge=16, description="crop side in pixels (whole code cells)")
    lr: float = Field(1e-4, gt=0)
    validate_every: int = Field(500, ge=1, description="validate with refined codes, keep best")
    amp: bool = Field(True, description="bfloat16 autocast where the device has it natively")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class AttackConfig(Strict):
    """How hard `primis attack` tries (SECURITY.md: threat model): the training of the attacks
    that learn, and the seed of every random choice. The defaults make the measurement
    docs/privacy.md reports."""

    inversion_steps: int = Field(400, ge=1, description="training steps of the learned inversion")
    inversion_crop: int = Field(128, ge=16, description="its crop side in pixels")
    inversion_batch: int = Field(8, ge=1, description="its crops per step")
    distinguisher_steps: int = Field(
        600, ge=1, description="training steps of each true-vs-noise classifier"
    )
    distinguisher_crop: int = Field(192, ge=16, description="its crop side in pixels")
    distinguisher_batch: int = Field(4, ge=1, description="its crops per step")
    distinguisher_planes: int = Field(
        256, ge=1, description="atom planes (of all crops' maps and atoms) it trains on per step"
    )
    budget_check: bool = Field(
        False,
        description="train each learned attack twice as long and score it at both budgets",
    )
    utility_steps: int = Field(
        400, ge=1, description="U-Net training steps of the segmentation study (--masks)"
    )
    linkage_refine_steps: list[int] = Field(
        [0],
        description="refinement steps of the linkage attacker's candidate codes, one "
        "measurement each (0: the encoder's code)",
    )
    seed: int = 0


# `primis attack --quick`: every attack runs, briefly; a smoke test, not a measurement.
QUICK_ATTACKS = AttackConfig(inversion_steps=30, distinguisher_steps=50, utility_steps=20)


class UtilityConfig(Strict):
    """How `primis utility` measures (issue 27): image size, the classifier, the bootstrap, the
    segmentation network, the texture discretisation and the attack suite whose images it
    reuses (`configs/utility-small.yaml`: a smaller run, the one MODEL_CARD.md reports)."""

    max_side: int = Field(
        256, ge=32, description="every image is first resized to at most this longer side"
    )
    cnn_size: int = Field(128, ge=16, description="classifier input side in pixels")
    cnn_steps: int = Field(300, ge=1, description="classifier training steps per fold")
    folds: int = Field(5, ge=2, description="grouped cross-validation folds")
    bootstrap: int = Field(1000, ge=10, description="bootstrap resamples of each AUC")
    unet_steps: int = Field(400, ge=1, description="U-Net training steps (segmentation)")
    texture_bins: int = Field(
        32, ge=2, description="fixed bin number of the texture features' discretisation"
    )
    attack: AttackConfig = AttackConfig()
    seed: int = 0


# `primis utility --quick`: every study runs, briefly; a smoke test, not a measurement.
QUICK_UTILITY = UtilityConfig(
    max_side=128, cnn_size=32, cnn_steps=20, bootstrap=50, unet_steps=10, attack=QUICK_ATTACKS
)


class NodeDefaults(Strict):
    """The defaults of the DICOM node (`primis.dicomnode.DicomNode` and `primis serve`, which
    both read `NODE_DEFAULTS`, so the command line and the API cannot drift apart)."""

    ae_title: str = "PRIMIS"
    host: str = Field("127.0.0.1", description="loopback unless asked: no listening on a LAN")
    port: int = 11112
    queue_after_spool: int = Field(1000, description="instances waiting to be shared (after-spool)")
    queue_after_share: int = Field(8, description="instances waiting to be shared (after-share)")
    queue_timeout: float = Field(30.0, description="seconds an instance waits for room")
    ack: Literal["after-spool", "after-share"] = "after-spool"
    spool_max_bytes: int = Field(4 << 30, description="spooled and not yet shared, at most")
    max_pdu_bytes: int = Field(1 << 20, description="a PDU declaring more is refused unread")
    max_instance_bytes: int = Field(256 << 20, description="an instance larger is refused")
    failed_keep: int = Field(100, description="refused instances kept in SPOOL/failed/")
    failed_days: float = Field(7.0, description="days a refused instance is kept")
    max_associations: int = 10
    answer_timeout: float = Field(3600.0, description="seconds a C-STORE waits for its answer")


NODE_DEFAULTS = NodeDefaults()


class RunConfig(Strict):
    """Everything a training run needs; the file `primis train --config` reads."""

    model: ModelConfig = ModelConfig()
    obfuscation: ObfuscationConfig = ObfuscationConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        too_big = [k for k in self.train.k_choices if k < 1 or 2 * k > self.model.n]
        if too_big:
            raise ValueError(f"k_choices {too_big} must lie in 1..n/2")
        if self.train.rate_weight > 0 and not self.model.adaptive_rate:
            raise ValueError("train.rate_weight > 0 needs model.adaptive_rate: true")
        from primis.obfuscation import reveals_nothing  # it imports this module

        if self.model.adaptive_rate and not reveals_nothing(self.obfuscation):
            raise ValueError(ADAPTIVE_STRICT_ONLY)
        if self.train.crop % self.model.downsampling:
            raise ValueError(
                f"crop ({self.train.crop}) must be a multiple of the model's downsampling "
                f"({self.model.downsampling})"
            )
        return self


def load_run_config(path: Path | None) -> RunConfig:
    """Read a YAML or JSON run configuration; ``None`` gives the documented defaults."""
    return RunConfig() if path is None else load_config(RunConfig, path)


def save_config(path: Path, config: Strict) -> None:
    """Write ``config`` as YAML (atomically), as `load_config` reads it."""
    from primis.io.files import write_atomic

    write_atomic(path, yaml.safe_dump(config.model_dump(), sort_keys=False).encode())


def with_overrides(config: Strict, values: dict, section: str | None = None) -> Strict:
    """``config`` with the fields of ``values`` that are not None changed (those of
    ``section``, e.g. "train", when given), validated as command-line settings."""
    changes = {name: value for name, value in values.items() if value is not None}
    if not changes:
        return config
    data = config.model_dump()
    (data[section] if section else data).update(changes)
    return parse_config(type(config), data, "command line")


def load_config(cls: type[Strict], path: Path):
    """Read a YAML or JSON file and validate it as ``cls``."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise PrimisError(f"cannot read config {path}: {err.strerror}") from None
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise PrimisError(f"config {path} is not valid YAML/JSON: {err}".splitlines()[0]) from None
    return parse_config(cls, data or {}, str(path))


S = TypeVar("S", bound=Strict)


def study_config(cls: type[S], quick_config: S, path: Path | None, quick: bool) -> S:
    """The settings of a measuring command (`primis attack`, `primis utility`): ``quick_config``
    with ``quick`` (--quick), or those of the file at ``path`` (--config), or the defaults."""
    if quick and path:
        raise PrimisError("--quick and --config exclude each other")
    if quick:
        return quick_config
    return load_config(cls, path) if path else cls()


def parse_config(cls: type[Strict], data: object, where: str):
    """Validate ``data`` as ``cls``; any problem becomes one readable PrimisError line."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise PrimisError(f"{where}: {loc}: {first['msg']}") from None
