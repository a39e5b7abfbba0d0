"""Block ciphers in ECB over numpy arrays of 16-byte blocks.

Every sector mode here is built from ECB passes over whole requests (see
cipher.py). A 16-byte block is a pair of little-endian uint64 (lo, hi).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TypeAlias

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

try:  # moved to "decrepit" in cryptography 47+
    from cryptography.hazmat.decrepit.ciphers.algorithms import Camellia
except ImportError:  # pragma: no cover
    Camellia = algorithms.Camellia  # type: ignore[misc]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("nbdluks' vectorized ciphers assume a little-endian machine")

U64 = np.dtype("<u8")
Array: TypeAlias = "np.ndarray[Any, Any]"
# name -> (algorithm, its key sizes in bytes)
BLOCK_CIPHERS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "aes": (algorithms.AES, (16, 24, 32)),
    "camellia": (Camellia, (16, 24, 32)),
    "sm4": (algorithms.SM4, (16,)),
}


def run(ctx: Any, arr: Array) -> Array:
    """A new array of arr's shape: ctx (an ECB context) over its blocks."""
    arr = np.ascontiguousarray(arr)
    # update_into wants room for one more block than the input.
    out = np.empty(arr.size + 2, dtype=U64)
    ctx.update_into(arr.data.cast("B"), out.data.cast("B"))
    return out[: arr.size].reshape(arr.shape)


class Ecb:
    """One key of a block cipher in ECB.

    ECB contexts keep no state between update() calls: each thread keeps one
    per direction instead of paying to build one per request.
    """

    __slots__ = ("_cipher", "_local")

    def __init__(self, cipher: str, key: bytes | bytearray) -> None:
        self._cipher = Cipher(BLOCK_CIPHERS[cipher][0](bytes(key)), modes.ECB())
        self._local = threading.local()

    def encryptor(self) -> Any:
        try:
            return self._local.enc
        except AttributeError:
            ctx = self._local.enc = self._cipher.encryptor()
            return ctx

    def decryptor(self) -> Any:
        try:
            return self._local.dec
        except AttributeError:
            ctx = self._local.dec = self._cipher.decryptor()
            return ctx

    def encrypt(self, arr: Array) -> Array:
        return run(self.encryptor(), arr)

    def decrypt(self, arr: Array) -> Array:
        return run(self.decryptor(), arr)
