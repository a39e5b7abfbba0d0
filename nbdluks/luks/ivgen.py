"""dm-crypt's IV generators, for runs of units at once.

Unit j of a run that starts at IV sector `first_iv` has IV sector
first_iv + j * step. Each generator fills a (count, 2) uint64 array (the
16-byte IV of each unit) from those sector numbers; it is looked up by name
once, when a SectorCipher is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from .ecb import U64, Array, Ecb
from .errors import UnsupportedError

_MASK64 = 0xFFFFFFFFFFFFFFFF


def _plain64(sectors: Array, ivs: Array) -> None:
    ivs[:, 0] = sectors


def _plain(sectors: Array, ivs: Array) -> None:
    ivs[:, 0] = sectors & np.uint64(0xFFFFFFFF)


def _plain64be(sectors: Array, ivs: Array) -> None:
    ivs[:, 1] = sectors.byteswap()


def _benbi(sectors: Array, ivs: Array) -> None:
    # big-endian count of 16-byte blocks (sector << 5 for 512 bytes), from 1
    ivs[:, 1] = ((sectors << np.uint64(5)) + np.uint64(1)).byteswap()


def _null(sectors: Array, ivs: Array) -> None:
    pass


# name -> how it fills the IVs from the sector numbers. essiv encrypts the
# plain64 IVs afterwards (see IvGen); "" is ecb's absent IV.
_FILL: dict[str, Callable[[Array, Array], None]] = {
    "plain64": _plain64, "plain": _plain, "plain64be": _plain64be, "essiv": _plain64,
    "benbi": _benbi, "null": _null, "": _null,
}
NAMES = tuple(name for name in _FILL if name)


class IvGen:
    """The IVs of runs of `count` units from IV sector `first_iv`."""

    __slots__ = ("_essiv", "_fill", "name", "step")

    def __init__(self, name: str, step: int, essiv: Ecb | None = None) -> None:
        self.name = name
        self.step = step
        self._fill = _FILL[name]
        self._essiv = essiv

    def __call__(self, first_iv: int, count: int) -> Array:
        """(count, 2) uint64: the 16-byte IV of each unit."""
        sectors = np.arange(count, dtype=U64) * np.uint64(self.step) + np.uint64(
            first_iv & _MASK64)
        ivs = np.zeros((count, 2), dtype=U64)
        self._fill(sectors, ivs)
        return ivs if self._essiv is None else self._essiv.encrypt(ivs)


def make(name: str, ivhash: str, cipher: str, key: bytes | bytearray, step: int) -> IvGen:
    """The generator `name` ("essiv" with `ivhash`) for a volume key."""
    if not ivhash:
        return IvGen(name, step)
    # ESSIV: the plain64 IV encrypted with the hash of the whole volume key
    salt = hashlib.new(ivhash, bytes(key)).digest()
    try:
        return IvGen(name, step, Ecb(cipher, salt))
    except ValueError as e:
        raise UnsupportedError(
            f"essiv:{ivhash} gives a {len(salt)}-byte key, not valid for {cipher}"
        ) from e
