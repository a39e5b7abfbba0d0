"""Sector modes over whole requests: the base every mode implementation
shares, and CBC, ECB and CTR (XTS is in xts.py and engines.py).

Each is built once per SectorCipher, bound to its keys, IV generator and
sector size, and encrypts or decrypts runs of whole units in place: CBC
decryption is one ECB pass plus XORs, CBC encryption chains column by
column across all units at once, CTR is one ECB pass over the counters.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np

from ..block import Decrypt
from .ecb import U64, Array, Ecb, run
from .ivgen import IvGen

Buffer: TypeAlias = "bytearray | memoryview"


class Mode:
    """A sector mode bound to its keys: encrypt and decrypt whole units in
    place, unit j having IV sector first_iv + j * step."""

    engine = "numpy"  # what does the work, for the log

    def __init__(self, sector_size: int) -> None:
        self.sector_size = sector_size
        self.blocks = sector_size // 16

    def units(self, buf: Buffer) -> int:
        """How many whole units `buf` holds; ValueError if not whole."""
        count, rest = divmod(len(buf), self.sector_size)
        if rest:
            raise ValueError(
                f"buffer of {len(buf)} bytes is not whole {self.sector_size}-byte units"
            )
        return count

    def view(self, buf: Buffer) -> tuple[Array, int]:
        """(units, blocks, 2) uint64 over `buf`, and the count of units."""
        count = self.units(buf)
        return np.frombuffer(buf, dtype=U64).reshape(count, self.blocks, 2), count

    def direct(self, first_iv: int) -> Decrypt | None:
        """Decryption as C code calls it, on this thread, the device's first
        unit having IV `first_iv`; None: this engine is not C's."""
        return None

    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        raise NotImplementedError

    def decrypt(self, buf: Buffer, first_iv: int) -> None:
        raise NotImplementedError


class _Numpy(Mode):
    """A mode built on ECB passes of one key, with its IV generator."""

    def __init__(self, data: Ecb, ivs: IvGen, sector_size: int) -> None:
        super().__init__(sector_size)
        self._data = data
        self._ivs = ivs


class Cbc(_Numpy):

    def decrypt(self, buf: Buffer, first_iv: int) -> None:
        data, count = self.view(buf)
        if count == 0:
            return
        plain = self._data.decrypt(data)
        prev = np.empty_like(data)
        prev[:, 0, :] = self._ivs(first_iv, count)
        prev[:, 1:, :] = data[:, :-1, :]
        np.bitwise_xor(plain, prev, out=data)

    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        data, count = self.view(buf)
        if count == 0:
            return
        enc = self._data.encryptor()
        prev = self._ivs(first_iv, count)
        for i in range(self.blocks):
            prev = run(enc, np.bitwise_xor(data[:, i, :], prev))
            data[:, i, :] = prev


class EcbMode(_Numpy):
    def decrypt(self, buf: Buffer, first_iv: int) -> None:
        data, count = self.view(buf)
        if count:
            data[...] = self._data.decrypt(data)

    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        data, count = self.view(buf)
        if count:
            data[...] = self._data.encrypt(data)


class Ctr(_Numpy):
    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        """XOR with the keystream: decryption is the same."""
        data, count = self.view(buf)
        if count == 0:
            return
        # The kernel's ctr() counts the IV as a big-endian 128-bit integer;
        # with plain/plain64 IVs the upper 64 bits (bytes 8..15) start at 0,
        # so block i's counter has be64(i) there.
        ivs = self._ivs(first_iv, count)
        ctr = np.empty_like(data)
        ctr[:, :, 0] = ivs[:, None, 0]
        hi_be = ivs[:, 1].byteswap()[:, None] + np.arange(self.blocks, dtype=U64)[None, :]
        ctr[:, :, 1] = hi_be.byteswap()
        np.bitwise_xor(data, self._data.encrypt(ctr), out=data)

    decrypt = encrypt
