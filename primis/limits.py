"""Resource limits, checked from headers before any large allocation, decode or key derivation.

Each limit has a default and an environment variable that changes it (a positive integer), so
a site with larger images or stronger passphrase settings can raise it and a shared service
can lower it. SECURITY.md lists them.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from primis.errors import PrimisError


@dataclass(frozen=True)
class Limit:
    """A named upper bound; :meth:`value` reads ``variable`` from the environment each time."""

    variable: str
    default: int
    what: str

    def value(self) -> int:
        text = os.environ.get(self.variable)
        if text is None or not text.strip():
            return self.default
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise PrimisError(f"{self.variable}={text!r}: expected a positive integer")
        return value

    def check(self, amount: int, name: str) -> None:
        """Raise a PrimisError naming ``name`` when ``amount`` exceeds the limit."""
        limit = self.value()
        if amount > limit:
            raise PrimisError(
                f"{name}: {amount} {self.what} exceed the limit of {limit} "
                f"(set {self.variable} to change it)"
            )


MAX_PIXELS = Limit("PRIMIS_MAX_PIXELS", 1 << 26, "pixels")
MAX_FILE_BYTES = Limit("PRIMIS_MAX_FILE_BYTES", 1 << 30, "bytes")
MAX_CODE_ENTRIES = Limit("PRIMIS_MAX_CODE_ENTRIES", 1 << 27, "code entries")
MAX_CODE_VECTORS = Limit("PRIMIS_MAX_CODE_VECTORS", 1 << 21, "code vectors")
MAX_SCRYPT_BYTES = Limit("PRIMIS_MAX_SCRYPT_BYTES", 1 << 28, "scrypt memory bytes")
MAX_KEY_SLOTS = Limit("PRIMIS_MAX_KEY_SLOTS", 64, "recipient slots")
ALL = (
    MAX_PIXELS,
    MAX_FILE_BYTES,
    MAX_CODE_ENTRIES,
    MAX_CODE_VECTORS,
    MAX_SCRYPT_BYTES,
    MAX_KEY_SLOTS,
)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


def release_free_memory() -> bool:
    """Hand memory freed by the process back to the operating system where the C library keeps
    it (glibc keeps freed blocks of a few MB for reuse, scattered so that they add up to
    hundreds of MB in a large image's refinement); called between a large image's regions, it
    keeps peak memory near what is in use. Not per refinement step: taking the memory back
    from the OS at every step made a 512x512 image's refinement measurably slower. Returns whether
    the C library offered it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
