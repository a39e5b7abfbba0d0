"""The engines of XTS, and which one a SectorCipher gets: chosen once, when
it is built, from what this machine has and the volume's sector size.

All compute the same bytes:
- "numpy" (xts.py): a fixed cost per request, then little per unit. The
  only engine for Camellia and SM4, for AES-192 (OpenSSL has no
  AES-192-XTS), and for keys whose halves are equal (OpenSSL refuses them).
- "openssl-evp+c": libcrypto's EVP one unit at a time, the loop in the C
  helper (_xtsloop.c) with the GIL released. No fixed cost and the least
  per unit: with the helper built, it serves every AES-XTS request.
- "openssl-evp": the same loop in Python through ctypes, two calls per
  unit. No fixed cost, but more per unit than numpy's: it serves every
  request at sector sizes where it outruns numpy at any length, else
- "numpy+openssl-evp": ctypes for requests of up to EVP_MAX_UNITS units,
  numpy for the longer ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..block import Decrypt
from . import evp
from .ecb import Ecb
from .evp import EvpXts
from .ivgen import IvGen
from .modes import Buffer, Mode
from .xts import NumpyXts

ALWAYS = sys.maxsize
# The longest request, in units, for which EVP through ctypes beats numpy,
# per sector size (ALWAYS: at every length). These are measured values:
# their source of truth is `python -m bench.cipher_bench --section crossover`,
# which prints this table as measured (here: 2 cores, numpy 2.4,
# cryptography 50, the system's OpenSSL 3.0); rerun it and copy its table
# when numpy, cryptography, OpenSSL or an engine changes. Near a crossover
# both engines cost about the same, so run-to-run noise there is harmless.
# The longer the unit, the fewer ctypes calls per byte: larger sectors stay
# with EVP longer.
EVP_MAX_UNITS: dict[int, int] = {512: 24, 1024: 48, 2048: ALWAYS, 4096: ALWAYS}


def evp_max_units(sector_size: int) -> int:
    """EVP_MAX_UNITS for `sector_size`, else the entry of the largest
    sector size below it (0, never EVP, below them all)."""
    below = [size for size in EVP_MAX_UNITS if size <= sector_size]
    return EVP_MAX_UNITS[max(below)] if below else 0


class _Evp(Mode):
    def __init__(self, xts: EvpXts, ivs: IvGen, sector_size: int) -> None:
        super().__init__(sector_size)
        self._xts = xts
        self._ivs = ivs


class CtypesXts(_Evp):
    engine = "openssl-evp"

    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        count = self.units(buf)
        if count:
            self._xts.crypt(buf, self.sector_size, self._ivs(first_iv, count), True)

    def decrypt(self, buf: Buffer, first_iv: int) -> None:
        count = self.units(buf)
        if count:
            self._xts.crypt(buf, self.sector_size, self._ivs(first_iv, count), False)


class CXts(_Evp):
    engine = "openssl-evp+c"

    def __init__(self, xts: EvpXts, ivs: IvGen, sector_size: int) -> None:
        super().__init__(xts, ivs, sector_size)
        # The C helper makes the plain IVs itself; others (essiv) come in an array.
        self._iv_mode = evp.C_IVGENS.get(ivs.name, 0)
        self._step = ivs.step

    def direct(self, first_iv: int) -> Decrypt | None:
        if not self._iv_mode:  # essiv: IVs come from Python
            return None
        init, update, ctx = self._xts.c_context(encrypt=False)
        return Decrypt(init, update, ctx, self._iv_mode, first_iv, self._step, self.sector_size)

    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        self._crypt(buf, first_iv, True)

    def decrypt(self, buf: Buffer, first_iv: int) -> None:
        self._crypt(buf, first_iv, False)

    def _crypt(self, buf: Buffer, first_iv: int, encrypt: bool) -> None:
        count = self.units(buf)
        if count:
            ivs = None if self._iv_mode else self._ivs(first_iv, count)
            self._xts.crypt_c_mode(buf, self.sector_size, first_iv, self._step, self._iv_mode,
                                   ivs, encrypt)


class HybridXts(Mode):
    """`short` for requests of up to `max_units` units, else `long`."""

    engine = "numpy+openssl-evp"

    def __init__(self, short: Mode, long: Mode, max_units: int) -> None:
        super().__init__(long.sector_size)
        self._short = short
        self._long = long
        self._max_bytes = max_units * long.sector_size

    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        (self._short if len(buf) <= self._max_bytes else self._long).encrypt(buf, first_iv)

    def decrypt(self, buf: Buffer, first_iv: int) -> None:
        (self._short if len(buf) <= self._max_bytes else self._long).decrypt(buf, first_iv)


def best_engine(xts: EvpXts | None, sector_size: int) -> str:
    """The fastest engine with `xts` (None: libcrypto cannot do this key)."""
    if xts is None:
        return "numpy"
    if xts.in_c:
        return "openssl-evp+c"
    max_units = evp_max_units(sector_size)
    if max_units == ALWAYS:
        return "openssl-evp"
    return "numpy+openssl-evp" if max_units else "numpy"


_Build = Callable[[NumpyXts, EvpXts, IvGen, int], Mode]
_EVP_ENGINES: dict[str, _Build] = {
    "openssl-evp+c": lambda _np, x, ivs, size: CXts(x, ivs, size),
    "openssl-evp": lambda _np, x, ivs, size: CtypesXts(x, ivs, size),
    "numpy+openssl-evp": lambda np_, x, ivs, size: HybridXts(
        CtypesXts(x, ivs, size), np_, evp_max_units(size)),
}
ENGINES = ("numpy", *_EVP_ENGINES)


def xts(cipher: str, key: bytes | bytearray, ivs: IvGen, sector_size: int,
        engine: str | None = None) -> Mode:
    """XTS with `key` (data key, then tweak key) by `engine`, by default the
    fastest here; ValueError if that engine cannot do it."""
    half = len(key) // 2
    numpy_xts = NumpyXts(Ecb(cipher, key[:half]), Ecb(cipher, key[half:]), ivs, sector_size)
    if engine == "numpy":
        return numpy_xts
    if engine is not None and engine not in _EVP_ENGINES:
        raise ValueError(f"no XTS engine {engine!r}; engines: {', '.join(ENGINES)}")
    evp_xts = evp.load(key) if cipher == "aes" else None
    if engine is None:
        engine = best_engine(evp_xts, sector_size)
        if engine == "numpy":
            return numpy_xts
    if evp_xts is None or (engine == "openssl-evp+c" and not evp_xts.in_c):
        raise ValueError(f"the {engine} engine cannot do {cipher}-xts with this key here")
    return _EVP_ENGINES[engine](numpy_xts, evp_xts, ivs, sector_size)
