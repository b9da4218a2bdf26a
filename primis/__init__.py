"""PRIMIS: privacy-preserving medical image sharing with sparse ternary codes and private keys."""

from primis.config import ModelConfig, ObfuscationConfig, RunConfig
from primis.model import SparseTernaryAutoEncoder

__all__ = ["ModelConfig", "ObfuscationConfig", "RunConfig", "SparseTernaryAutoEncoder"]
