"""Saving and loading trained models: weights in safetensors, configuration in JSON.

A model is identified by the SHA-256 of its canonical configuration and its weight file; public
files name the model by that hash. A model directory may hold only the tensors that differ from
a bundled ``base`` model (bundled models that share their encoder or decoder store it once); its
weight file is then the base's tensors with its own on top, written as one safetensors file,
byte for byte the file it was exported from.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from primis.bundled import CONFIG, DEFAULT_MODEL, ZOO, bundled_models
from primis.config import (
    LATER_MODEL_OPTIONS,
    ModelConfig,
    ObfuscationConfig,
    Strict,
    parse_config,
    with_later_options,
)
from primis.errors import PrimisError
from primis.io.files import write_atomic
from primis.keys import TENSORS as KEY_MODEL_TENSORS
from primis.keys import KeyCoder, KeyModel, key_coder
from primis.model import SparseTernaryAutoEncoder

WEIGHTS = "model.safetensors"
FORMAT = "primis-model"
VERSION = 1


class ModelFile(Strict):
    format: str
    version: int
    model: ModelConfig
    obfuscation: ObfuscationConfig = ObfuscationConfig()
    base: str | None = None  # the bundled model whose tensors fill in those this file lacks


@dataclass
class LoadedModel:
    network: SparseTernaryAutoEncoder
    obfuscation: ObfuscationConfig
    hash: str
    directory: Path
    key_model: KeyModel | None = None  # entropy model of its keys, where the model has one

    @cached_property
    def key_coder(self) -> KeyCoder:
        """How this model's keys are coded (`primis.keys.key_coder`), made once."""
        return key_coder(self.key_model)


def _canonical(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def model_hash(config: ModelConfig, weights: bytes) -> str:
    """SHA-256 of the canonical configuration and the weight file. Options added later enter
    only when they differ from what older models have, so those keep their hash."""
    fields = config.model_dump()
    for name, before in LATER_MODEL_OPTIONS.items():
        if fields[name] == before:
            del fields[name]
    return hashlib.sha256(_canonical(fields) + weights).hexdigest()


def save_model(
    directory: Path,
    network: SparseTernaryAutoEncoder,
    obfuscation: ObfuscationConfig,
    dtype: torch.dtype = torch.float32,
    key_model: KeyModel | None = None,
    base: str | None = None,
) -> str:
    """Write model.safetensors and model.json into ``directory``; return the model hash.

    ``dtype`` float16 halves the file (for the bundled model); loading casts back to float32.
    Integer buffers (batch counters) keep their type. A ``key_model`` (the entropy model of
    keys, `primis.keys`) is stored with the weights, in float32, so the hash covers it.
    With ``base`` (a bundled model's name), the file holds only the tensors that differ from
    the base's; the model's hash is that of the whole weight file all the same.
    """
    state = {
        name: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
        for name, t in network.state_dict().items()
    }
    if key_model is not None:
        state |= {name: torch.from_numpy(t.copy()) for name, t in key_model.tensors().items()}
    weights = save(state)
    stored = weights
    if base is not None:
        if base not in bundled_models():
            raise PrimisError(f"base {base}: not a bundled model ({', '.join(bundled_models())})")
        inherited = load(_weights(ZOO / base, _read_config(ZOO / base)))
        if not set(inherited) <= set(state):
            raise PrimisError(f"base {base}: holds tensors this model does not have")
        stored = save({name: t for name, t in state.items() if not _same(t, inherited.get(name))})
    meta = ModelFile(
        format=FORMAT, version=VERSION, model=network.config, obfuscation=obfuscation, base=base
    )
    write_atomic(Path(directory) / WEIGHTS, stored)
    config = meta.model_dump()
    if base is None:
        del config["base"]  # what model files without a base have always held
    write_atomic(Path(directory) / CONFIG, json.dumps(config, indent=2).encode())
    return model_hash(network.config, weights)


def _same(tensor: torch.Tensor, other: torch.Tensor | None) -> bool:
    return (
        other is not None
        and tensor.dtype == other.dtype
        and tensor.shape == other.shape
        and bool(torch.equal(tensor, other))
    )


def _read_config(directory: Path) -> ModelFile:
    try:
        data = json.loads((directory / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise PrimisError(f"{directory / CONFIG}: unreadable model config ({err})") from None
    meta = parse_config(ModelFile, with_later_options(data), str(directory / CONFIG))
    if meta.format != FORMAT or meta.version != VERSION:
        raise PrimisError(
            f"{directory / CONFIG}: unsupported model format {meta.format} v{meta.version}"
        )
    return meta


def _weights(directory: Path, meta: ModelFile, seen: tuple[Path, ...] = ()) -> bytes:
    """The whole weight file of the model in ``directory`` (whose config is ``meta``): its own,
    or, with a base, the base's tensors (its whole weight file, recursively) with its own on
    top."""
    own = (directory / WEIGHTS).read_bytes()
    if meta.base is None:
        return own
    seen = (*seen, directory.resolve())
    base = ZOO / meta.base
    if meta.base not in bundled_models() or base.resolve() in seen:
        raise PrimisError(f"{directory / CONFIG}: base {meta.base} is not another bundled model")
    try:
        return save(load(_weights(base, _read_config(base), seen)) | load(own))
    except (OSError, SafetensorError) as err:
        raise PrimisError(f"{directory / WEIGHTS}: unreadable weights ({err})") from None


def bundled_model_with_hash(digest: str) -> str | None:
    """The name of the bundled model whose hash is ``digest``, if one is."""
    for name in bundled_models():
        try:
            meta = _read_config(ZOO / name)
            if model_hash(meta.model, _weights(ZOO / name, meta)) == digest:
                return name
        except (OSError, ValueError, PrimisError):
            continue
    return None


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A model directory from a path, a bundled model's name, or (None) the default model."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
        if DEFAULT_MODEL not in bundled_models():
            raise PrimisError("no --model given and no bundled default model is installed")
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in bundled_models():
        return ZOO / str(name_or_path)
    names = ", ".join(bundled_models()) or "none"
    raise PrimisError(f"--model {name_or_path}: no such run directory or bundled model ({names})")


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; a named device that is absent is an error."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PrimisError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local % torch.cuda.device_count())
    if name == "mps" and not torch.backends.mps.is_available():
        raise PrimisError("--device mps: no MPS device is available")
    return torch.device(name)


def load_model(directory: str | Path | None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load and validate a model: a run directory, a bundled model's name, or the default."""
    directory = resolve_model(directory)
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise PrimisError(f"{directory}: not a PRIMIS model (needs {CONFIG} and {WEIGHTS})")
    meta = _read_config(directory)
    weights = _weights(directory, meta)
    network = SparseTernaryAutoEncoder(meta.model)
    try:
        state = load(weights)
        key_tensors = {name: state.pop(name).numpy() for name in KEY_MODEL_TENSORS if name in state}
        network.load_state_dict(state, strict=True)
        key_model = KeyModel.from_tensors(key_tensors) if key_tensors else None
    except (SafetensorError, RuntimeError, ValueError, KeyError, PrimisError) as err:
        first = str(err).strip().splitlines()[0]
        raise PrimisError(
            f"{directory / WEIGHTS}: weights do not fit the config ({first})"
        ) from None
    cfg = meta.model
    if key_model is not None and not key_model.fits(cfg.m, cfg.n, cfg.k):
        raise PrimisError(f"{directory / WEIGHTS}: the key model does not fit the config")
    network.eval().to(device)
    digest = model_hash(meta.model, weights)
    return LoadedModel(network, meta.obfuscation, digest, directory, key_model)


def describe_model(directory: str | Path | None) -> dict:
    """What `primis info` prints for a model directory or bundled model's name: its hash, its
    network's configuration, its obfuscation settings and how its keys are coded."""
    model = load_model(directory)
    config = model.network.config
    key_model = model.key_model
    return {
        "kind": "model",
        "hash": model.hash,
        "model": config.model_dump(),
        "downsampling": config.downsampling,
        "obfuscation": model.obfuscation.model_dump(),
        "keys": (
            {"coding": "enumerative"}
            if key_model is None
            else {"coding": "context", "couplings": key_model.coupled}
        ),
    }
