"""PRIMIS: privacy-preserving medical image sharing with sparse ternary codes and private keys.

The Python API (see `primis.api` and docs/api.md)::

    import primis

    model = primis.load_model("cxr")
    shared = primis.share("chest.png", model=model)  # .public and .key bytes
    image = primis.restore(shared.public, shared.key, model=model)

Names are imported on first use, so the command line answers `--help` without loading torch.
"""

import os
from importlib import import_module

# oneDNN (torch's CPU convolutions) keeps up to 1024 compiled primitives with their buffers, one
# set per tile shape: hundreds of MB for a large image's tiles (docs/method.md, "Images of any
# size"). 64 keep the speed; a value set by the user wins. Read when torch first convolves.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

_EXPORTS = {
    "AttackConfig": "primis.config",
    "FinetuneConfig": "primis.config",
    "ModelConfig": "primis.config",
    "ObfuscationConfig": "primis.config",
    "PrimisError": "primis.errors",
    "PrivacyWarning": "primis.errors",
    "RestoredDataset": "primis.api",
    "RunConfig": "primis.config",
    "SharedFile": "primis.api",
    "SharedImage": "primis.api",
    "SparseTernaryAutoEncoder": "primis.model",
    "attacker_view": "primis.api",
    "attacker_view_file": "primis.api",
    "export_model": "primis.api",
    "load_model": "primis.api",
    "restore": "primis.api",
    "restore_dicom": "primis.api",
    "restore_file": "primis.api",
    "restore_many": "primis.cluster",
    "share": "primis.api",
    "share_file": "primis.api",
    "share_many": "primis.cluster",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'primis' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
