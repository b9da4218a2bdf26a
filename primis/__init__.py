"""PRIMIS: privacy-preserving medical image sharing with sparse ternary codes and private keys.

Names are imported on first use, so the command line answers `--help` without loading torch.
"""

from importlib import import_module

_EXPORTS = {
    "ModelConfig": "primis.config",
    "ObfuscationConfig": "primis.config",
    "RunConfig": "primis.config",
    "SparseTernaryAutoEncoder": "primis.model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'primis' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
