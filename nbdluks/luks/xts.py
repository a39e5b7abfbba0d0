"""XTS over whole requests with numpy: the engine for every XTS that
libcrypto's EVP does not serve (see engines.py).

A request is one ECB pass of the tweak key over the IVs (the first tweak
T_j of each unit), numpy multiplications by alpha in GF(2^128) for the
tweak T_j * alpha^i of every block i, and one ECB pass of the data key over
the data XORed with the tweaks.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from .ecb import U64, Array, Ecb
from .ivgen import IvGen
from .modes import Buffer, Mode

_REDUCE_SHIFTS = (np.uint64(1), np.uint64(2), np.uint64(7))
# Per-row shift amounts for the broadcast step: row i is row 0 times alpha^i.
_SHIFTS = np.arange(1, 32, dtype=np.uint64)[:, None]
_RSHIFTS = np.uint64(64) - _SHIFTS
_S32 = np.uint64(32)
# From this many units on, the tweak table's first 32 rows are built by
# doubling (more numpy calls, each cheaper) rather than in one broadcast:
# past it the per-call overhead no longer dominates.
DOUBLING_MIN = 64
# Work in pieces of about this size so temporaries stay in the CPU cache.
CHUNK = 512 * 1024


class Scratch(threading.local):
    """Per-thread reusable buffers: fresh large arrays cost page faults."""

    def __init__(self) -> None:
        self.arrays: dict[str, Array] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> Array:
        size = math.prod(shape)
        arr = self.arrays.get(name)
        if arr is None or arr.size < size:
            arr = self.arrays[name] = np.empty(size, dtype=U64)
        return arr[:size].reshape(shape)


_scratch = Scratch()


def _mul_rows(sl: Array, sh: Array, dl: Array, dh: Array, s_: Any, r_: Any, t: Array,
              o: Array) -> None:
    """(dl, dh) = (sl, sh) * alpha^s, with s < 64 per row (broadcast)."""
    # hi' = hi << s | lo >> (64 - s)
    np.left_shift(sh, s_, out=dh)
    np.right_shift(sl, r_, out=t)
    np.bitwise_or(dh, t, out=dh)
    # lo' = lo << s ^ reduce(hi >> (64 - s)), x^128 = x^7 + x^2 + x + 1
    np.right_shift(sh, r_, out=o)
    np.left_shift(sl, s_, out=dl)
    np.bitwise_xor(dl, o, out=dl)
    for k in _REDUCE_SHIFTS:
        np.left_shift(o, k, out=t)
        np.bitwise_xor(dl, t, out=dl)


def tweak_table(t0: Array, nb: int, scratch: Scratch) -> Array:
    """(count, nb, 2): t0[j] * alpha^i for every block i of every unit j.

    Computed block-major (one contiguous row per block index) into
    preallocated scratch, then interleaved once: numpy passes over
    contiguous rows stream through memory, and reused arrays take no page
    faults.
    """
    count = len(t0)
    lo = scratch.get("lo", (nb, count))
    hi = scratch.get("hi", (nb, count))
    first = min(32, nb)
    tmp = scratch.get("tmp", (first, count))
    ov = scratch.get("ov", (first, count))
    lo[0] = t0[:, 0]
    hi[0] = t0[:, 1]
    if count >= DOUBLING_MIN:
        # Rows [f, 2f) from rows [0, f) times alpha^f, f = 1, 2, 4, ...:
        # scalar shifts over contiguous rows run faster than the
        # broadcast shifts below, which only win by making fewer calls.
        f = 1
        while f < first:
            m = min(f, first - f)
            _mul_rows(lo[:m], hi[:m], lo[f : f + m], hi[f : f + m], np.uint64(f),
                      np.uint64(64 - f), tmp[:m], ov[:m])
            f += m
    elif first > 1:
        # Rows 1..31 straight from row 0 with per-row shifts: one pass.
        m = first - 1
        _mul_rows(lo[0:1], hi[0:1], lo[1:first], hi[1:first], _SHIFTS[:m], _RSHIFTS[:m],
                  tmp[:m], ov[:m])
    # Then by alpha^32 (shifts stay below 64 bits).
    filled = first
    while filled < nb:
        m = min(32, nb - filled)
        src = slice(filled - 32, filled - 32 + m)
        dst = slice(filled, filled + m)
        _mul_rows(lo[src], hi[src], lo[dst], hi[dst], _S32, _S32, tmp[:m], ov[:m])
        filled += m
    tw = scratch.get("tw", (count, nb, 2))
    tw[:, :, 0] = lo.T
    tw[:, :, 1] = hi.T
    return tw


class NumpyXts(Mode):
    """XTS with any block cipher: a fixed cost per request (the tweak table,
    the calls into numpy), then little per unit."""

    engine = "numpy"

    def __init__(self, data: Ecb, tweak: Ecb, ivs: IvGen, sector_size: int) -> None:
        super().__init__(sector_size)
        self._data = data
        self._tweak = tweak
        self._ivs = ivs
        self._step = ivs.step
        self._per = max(1, CHUNK // sector_size)

    def tweaks(self, first_iv: int, count: int, scratch: Scratch) -> Array:
        """(count, blocks, 2): the tweak of every block of `count` units."""
        return tweak_table(self._tweak.encrypt(self._ivs(first_iv, count)), self.blocks, scratch)

    def encrypt(self, buf: Buffer, first_iv: int) -> None:
        data, count = self.view(buf)
        if count:
            self.run(data, first_iv, count, self._data.encryptor())

    def decrypt(self, buf: Buffer, first_iv: int) -> None:
        data, count = self.view(buf)
        if count:
            self.run(data, first_iv, count, self._data.decryptor())

    def run(self, data: Array, first_iv: int, count: int, ctx: Any) -> None:
        """In place over `data` ((count, blocks, 2)), with ctx the data key's
        ECB context of the direction wanted."""
        sc = _scratch
        per = self._per
        for j in range(0, count, per):
            n = min(per, count - j)
            part = data[j : j + n]
            tw = self.tweaks(first_iv + j * self._step, n, sc)
            x = sc.get("x", part.shape)
            np.bitwise_xor(part, tw, out=x)
            y = sc.get("y", (x.size + 2,))
            ctx.update_into(x.data.cast("B"), y.data.cast("B"))
            np.bitwise_xor(y[: x.size].reshape(part.shape), tw, out=part)
