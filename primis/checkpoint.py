"""Resumable training state: weights and optimizer moments in safetensors, the rest in JSON.

    RUN/checkpoint/model.safetensors      network weights
    RUN/checkpoint/optimizer.safetensors  per-parameter optimizer tensors
    RUN/checkpoint/state.json             step, elapsed time, best score, optimizer groups, RNG

The directory is written under a temporary name and swapped in, so a kill at any moment leaves
either the previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from primis.errors import PrimisError

CHECKPOINT = "checkpoint"


def save_checkpoint(run: Path, network: torch.nn.Module, optimizer, state: dict) -> None:
    run = Path(run)
    tmp = run / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in opt["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, tmp / "optimizer.safetensors")
    rng = {
        "python": _jsonable(random.getstate()),
        "torch": torch.get_rng_state().tolist(),
    }
    full = state | {"param_groups": opt["param_groups"], "optimizer_scalars": scalars, "rng": rng}
    (tmp / "state.json").write_text(json.dumps(full))
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
    final, old = run / CHECKPOINT, run / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: Path, network: torch.nn.Module, optimizer) -> dict:
    """Restore weights, optimizer and RNG in place; return the saved training state."""
    run = Path(run)
    folder = run / CHECKPOINT
    if not (folder / "state.json").is_file() and (run / f".{CHECKPOINT}.old").is_dir():
        folder = run / f".{CHECKPOINT}.old"  # killed between the two renames
    try:
        state = json.loads((folder / "state.json").read_text())
        network.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        tensors = load_file(folder / "optimizer.safetensors")
    except (OSError, ValueError, RuntimeError) as err:
        raise PrimisError(
            f"{run}: no usable checkpoint to resume ({err})".splitlines()[0]
        ) from None
    slots: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    random.setstate(_tupled(state["rng"]["python"]))
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    return state


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
