"""Sector ciphers as dm-crypt defines them, computed in bulk.

A request of many sectors is a handful of vectorized operations, never a
cipher context per sector: XTS is one ECB pass over the IVs (the tweaks),
numpy multiplications by alpha in GF(2^128), and one ECB pass over the
data; CBC decryption is one ECB pass plus XORs; CBC encryption chains column
by column across all sectors at once. AES-XTS with 4096-byte sectors, and
short AES-XTS requests, go through libcrypto's EVP one unit at a time
instead (evp.py), which is faster there.

16-byte blocks are handled as pairs of little-endian uint64 (lo, hi).
"""

from __future__ import annotations

import hashlib
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import evp
from .errors import UnsupportedError
from .evp import EvpXts
from .hashes import digest_size

try:  # moved to "decrepit" in cryptography 47+
    from cryptography.hazmat.decrepit.ciphers.algorithms import Camellia
except ImportError:  # pragma: no cover
    Camellia = algorithms.Camellia  # type: ignore[misc]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("nbdluks' vectorized ciphers assume a little-endian machine")

U64 = np.dtype("<u8")
_REDUCE_SHIFTS = (np.uint64(1), np.uint64(2), np.uint64(7))
# Per-row shift amounts for the broadcast step: row i is row 0 times alpha^i.
_SHIFTS = np.arange(1, 32, dtype=np.uint64)[:, None]
_RSHIFTS = np.uint64(64) - _SHIFTS
_S32 = np.uint64(32)
# From this many units on, the tweak table's first 32 rows are built by
# doubling (more numpy calls, each cheaper) rather than in one broadcast.
_DOUBLING_MIN = 64
# Requests of up to this many units go through EVP (see SectorCipher): the
# crossovers with numpy that bench.cipher_bench finds. 2048- and 4096-byte
# sectors: always.
EVP_MAX_UNITS = {512: 16, 1024: 48}
EVP_ALWAYS = sys.maxsize
# Work in pieces of about this size so temporaries stay in the CPU cache.
CHUNK = 512 * 1024


class _Scratch(threading.local):
    """Per-thread reusable buffers: fresh large arrays cost page faults."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray[Any, Any]] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        size = math.prod(shape)
        arr = self.arrays.get(name)
        if arr is None or arr.size < size:
            arr = self.arrays[name] = np.empty(size, dtype=U64)
        return arr[:size].reshape(shape)


_scratch = _Scratch()
_BLOCK_CIPHERS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "aes": (algorithms.AES, (16, 24, 32)),
    "camellia": (Camellia, (16, 24, 32)),
    "sm4": (algorithms.SM4, (16,)),
}
_REFUSED = ("serpent", "twofish", "cast5", "cast6", "blowfish", "des3_ede", "des")
MODES = ("xts", "cbc", "ecb", "ctr")
IVGENS = ("plain64", "plain", "plain64be", "essiv", "benbi", "null")
SUPPORTED = (
    "aes/camellia/sm4 with xts-plain64, xts-plain, xts-plain64be, xts-essiv:HASH, "
    "cbc-essiv:HASH, cbc-plain64, cbc-plain, cbc-plain64be, cbc-benbi, cbc-null, "
    "ctr-plain64, ctr-plain, ecb"
)


@dataclass(frozen=True, slots=True)
class CipherSpec:
    cipher: str
    mode: str
    ivgen: str  # "" for ecb
    ivhash: str = ""  # essiv only

    @classmethod
    def parse(cls, name: str, mode: str | None = None) -> CipherSpec:
        """Parse "aes-xts-plain64" (LUKS2 style) or ("aes", "xts-plain64") (LUKS1)."""
        full = name if mode is None else f"{name}-{mode}"
        full = full.strip().lower()
        if full.startswith("capi:"):
            raise UnsupportedError(f"kernel crypto API cipher {full!r} is not supported")
        parts = full.split("-", 2)
        cipher = parts[0]
        if cipher in _REFUSED:
            raise UnsupportedError(
                f"cipher {cipher!r} is not supported (no implementation in the "
                f"cryptography package); supported: {SUPPORTED}"
            )
        if cipher not in _BLOCK_CIPHERS or len(parts) < 2:
            raise UnsupportedError(f"cipher {full!r} is not supported; supported: {SUPPORTED}")
        chain = parts[1]
        ivspec = parts[2] if len(parts) > 2 else ""
        ivgen, _, ivhash = ivspec.partition(":")
        if chain not in MODES:
            raise UnsupportedError(
                f"cipher mode {chain!r} is not supported; supported: {SUPPORTED}"
            )
        if chain == "ecb":
            if ivgen not in ("", "null"):
                raise UnsupportedError(f"ecb takes no IV generator, got {ivspec!r}")
            ivgen = ""
        elif ivgen not in IVGENS:
            raise UnsupportedError(
                f"IV generator {ivspec!r} is not supported; supported: {SUPPORTED}"
            )
        if ivgen == "essiv":
            if not ivhash or digest_size(ivhash) is None:
                raise UnsupportedError(f"essiv hash {ivhash!r} is not available")
        elif ivhash:
            raise UnsupportedError(f"IV generator {ivgen!r} takes no hash")
        return cls(cipher, chain, ivgen, ivhash)

    def __str__(self) -> str:
        iv = f"-{self.ivgen}" if self.ivgen else ""
        if self.ivhash:
            iv += f":{self.ivhash}"
        return f"{self.cipher}-{self.mode}{iv}"

    def check_key_size(self, key_bytes: int) -> None:
        sizes = _BLOCK_CIPHERS[self.cipher][1]
        per = key_bytes // 2 if self.mode == "xts" else key_bytes
        if (self.mode == "xts" and key_bytes % 2) or per not in sizes:
            raise UnsupportedError(
                f"{key_bytes}-byte key is not valid for {self}"
                f" (block cipher keys: {', '.join(map(str, sizes))} bytes"
                f"{', doubled for xts' if self.mode == 'xts' else ''})"
            )


def _ecb(cipher: str, key: bytes | bytearray) -> Cipher[modes.ECB]:
    return Cipher(_BLOCK_CIPHERS[cipher][0](bytes(key)), modes.ECB())


class SectorCipher:
    """Encrypts and decrypts runs of whole data units in place.

    `first_iv` is the IV sector number of the first unit; each further unit
    adds `iv_step` (sector_size / 512 for dm-crypt without iv_large_sectors).
    """

    def __init__(self, spec: CipherSpec, key: bytes | bytearray, sector_size: int = 512,
                 iv_step: int | None = None) -> None:
        spec.check_key_size(len(key))
        if sector_size % 16 or sector_size < 16:
            raise UnsupportedError(f"sector size {sector_size} is not a multiple of 16")
        self.spec = spec
        self.sector_size = sector_size
        self.iv_step = sector_size // 512 if iv_step is None else iv_step
        self.blocks = sector_size // 16
        # AES-XTS one unit at a time through libcrypto's EVP costs a call per
        # unit; the numpy pipeline a large fixed cost, then little per unit:
        # EVP wins for short requests and for large sectors.
        self._evp: EvpXts | None = None
        if spec.cipher == "aes" and spec.mode == "xts":
            self._evp = evp.load(key)
        self._evp_max = EVP_MAX_UNITS.get(sector_size, EVP_ALWAYS if sector_size >= 2048 else 0)
        if self._evp is not None and self._evp.in_c:
            self._evp_max = EVP_ALWAYS  # the C loop beats numpy at every size
        if spec.mode == "xts":
            half = len(key) // 2
            self._data = _ecb(spec.cipher, key[:half])
            self._tweak: Cipher[modes.ECB] | None = _ecb(spec.cipher, key[half:])
        else:
            self._data = _ecb(spec.cipher, key)
            self._tweak = None
        # ECB contexts are stateless between update() calls: keep one per
        # thread and direction instead of paying to build one per request.
        self._contexts = threading.local()
        self._essiv: Cipher[modes.ECB] | None = None
        if spec.ivgen == "essiv":
            salt = hashlib.new(spec.ivhash, bytes(key)).digest()
            try:
                self._essiv = _ecb(spec.cipher, salt)
            except ValueError as e:
                raise UnsupportedError(
                    f"essiv:{spec.ivhash} gives a {len(salt)}-byte key, not valid for {spec.cipher}"
                ) from e

    @property
    def engine(self) -> str:
        """What does the work, for the log."""
        if self._evp is None:
            return "numpy"
        if self._evp.in_c:
            return "openssl-evp+c"
        return "openssl-evp" if self._evp_max == EVP_ALWAYS else "numpy+openssl-evp"

    # --- IVs ------------------------------------------------------------

    def _ivs(self, first_iv: int, count: int) -> np.ndarray[Any, Any]:
        """(count, 2) uint64: the 16-byte IV of each unit."""
        sectors = (np.arange(count, dtype=U64) * np.uint64(self.iv_step)) + np.uint64(
            first_iv & 0xFFFFFFFFFFFFFFFF
        )
        ivs = np.zeros((count, 2), dtype=U64)
        g = self.spec.ivgen
        if g == "plain64" or g == "essiv":
            ivs[:, 0] = sectors
        elif g == "plain":
            ivs[:, 0] = sectors & np.uint64(0xFFFFFFFF)
        elif g == "plain64be":
            ivs[:, 1] = sectors.byteswap()
        elif g == "benbi":
            ivs[:, 1] = ((sectors << np.uint64(5)) + np.uint64(1)).byteswap()
        if self._essiv is not None:
            ivs = self._ecb_enc(self._essiv, ivs)
        return ivs

    @staticmethod
    def _ecb(ctx: Any, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        # update_into wants room for one more block than the input.
        arr = np.ascontiguousarray(arr)
        out = np.empty(arr.size + 2, dtype=U64)
        ctx.update_into(arr.data.cast("B"), out.data.cast("B"))
        return out[: arr.size].reshape(arr.shape)

    def _ctx(self, c: Cipher[modes.ECB], encrypt: bool) -> Any:
        # c lives as long as self, so its id cannot be reused meanwhile
        name = f"{id(c)}-{'e' if encrypt else 'd'}"
        ctx = getattr(self._contexts, name, None)
        if ctx is None:
            ctx = c.encryptor() if encrypt else c.decryptor()
            setattr(self._contexts, name, ctx)
        return ctx

    def _ecb_enc(self, c: Cipher[modes.ECB], arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return self._ecb(self._ctx(c, True), arr)

    def _ecb_dec(self, c: Cipher[modes.ECB], arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return self._ecb(self._ctx(c, False), arr)

    def _xts_tweaks(self, first_iv: int, count: int, scratch: _Scratch) -> np.ndarray[Any, Any]:
        """(count, blocks, 2): T_j * alpha^i for every block i of every unit j.

        Computed block-major (one contiguous row per block index) into
        preallocated scratch, then interleaved once: contiguous rows and no
        fresh allocations make each numpy pass several times faster.
        """
        assert self._tweak is not None
        t0 = self._ecb_enc(self._tweak, self._ivs(first_iv, count))
        nb = self.blocks
        lo = scratch.get("lo", (nb, count))
        hi = scratch.get("hi", (nb, count))
        tmp = scratch.get("tmp", (min(32, nb), count))
        ov = scratch.get("ov", (min(32, nb), count))
        lo[0] = t0[:, 0]
        hi[0] = t0[:, 1]
        first = min(32, nb)
        if count >= _DOUBLING_MIN:
            # Rows [f, 2f) from rows [0, f) times alpha^f, f = 1, 2, 4, ...:
            # scalar shifts over contiguous rows run faster than the
            # broadcast shifts below, which only win by making fewer calls.
            f = 1
            while f < first:
                m = min(f, first - f)
                sh = np.uint64(f)
                self._mul_rows(lo[:m], hi[:m], lo[f : f + m], hi[f : f + m], sh,
                               np.uint64(64 - f), tmp[:m], ov[:m])
                f += m
        elif first > 1:
            # Rows 1..31 straight from row 0 with per-row shifts: one pass.
            m = first - 1
            self._mul_rows(lo[0:1], hi[0:1], lo[1:first], hi[1:first], _SHIFTS[:m],
                           _RSHIFTS[:m], tmp[:m], ov[:m])
        # Then by alpha^32 (shifts stay below 64 bits).
        filled = first
        while filled < nb:
            m = min(32, nb - filled)
            self._mul_rows(lo[filled - 32 : filled - 32 + m], hi[filled - 32 : filled - 32 + m],
                           lo[filled : filled + m], hi[filled : filled + m],
                           _S32, _S32, tmp[:m], ov[:m])
            filled += m
        tw = scratch.get("tw", (count, nb, 2))
        tw[:, :, 0] = lo.T
        tw[:, :, 1] = hi.T
        return tw

    @staticmethod
    def _mul_rows(sl: np.ndarray[Any, Any], sh: np.ndarray[Any, Any], dl: np.ndarray[Any, Any],
                  dh: np.ndarray[Any, Any], s_: Any, r_: Any, t: np.ndarray[Any, Any],
                  o: np.ndarray[Any, Any]) -> None:
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

    # --- bulk operations ------------------------------------------------

    def _view(self, buf: bytearray | memoryview) -> tuple[np.ndarray[Any, Any], int]:
        if len(buf) % self.sector_size:
            raise ValueError(
                f"buffer of {len(buf)} bytes is not whole {self.sector_size}-byte units"
            )
        arr = np.frombuffer(buf, dtype=U64)
        return arr.reshape(-1, self.blocks, 2), len(buf) // self.sector_size

    def decrypt(self, buf: bytearray | memoryview, first_iv: int) -> None:
        data, count = self._view(buf)
        if count == 0:
            return
        mode = self.spec.mode
        if mode == "xts":
            self._xts_any(buf, data, first_iv, count, encrypt=False)
        elif mode == "cbc":
            plain = self._ecb_dec(self._data, data)
            prev = np.empty_like(data)
            prev[:, 0, :] = self._ivs(first_iv, count)
            prev[:, 1:, :] = data[:, :-1, :]
            np.bitwise_xor(plain, prev, out=data)
        elif mode == "ecb":
            data[...] = self._ecb_dec(self._data, data)
        else:  # ctr: XOR with the keystream either way
            self._ctr(data, first_iv, count)

    def encrypt(self, buf: bytearray | memoryview, first_iv: int) -> None:
        data, count = self._view(buf)
        if count == 0:
            return
        mode = self.spec.mode
        if mode == "xts":
            self._xts_any(buf, data, first_iv, count, encrypt=True)
        elif mode == "cbc":
            enc = self._ctx(self._data, True)
            prev = self._ivs(first_iv, count)
            for i in range(self.blocks):
                prev = self._ecb(enc, np.bitwise_xor(data[:, i, :], prev))
                data[:, i, :] = prev
        elif mode == "ecb":
            data[...] = self._ecb_enc(self._data, data)
        else:
            self._ctr(data, first_iv, count)

    def _xts_any(self, buf: bytearray | memoryview, data: np.ndarray[Any, Any], first_iv: int,
                 count: int, encrypt: bool) -> None:
        """EVP one unit at a time where that is faster, else the numpy pipeline."""
        evp_ = self._evp
        if evp_ is not None and count <= self._evp_max:
            if evp_.in_c:
                g = self.spec.ivgen
                ivs = None if g in evp.C_IVGENS else self._ivs(first_iv, count)
                evp_.crypt_c(buf, self.sector_size, first_iv, self.iv_step, g, ivs, encrypt)
            else:
                evp_.crypt(buf, self.sector_size, self._ivs(first_iv, count), encrypt)
        else:
            self._xts(data, first_iv, count, self._ctx(self._data, encrypt))

    def _xts(self, data: np.ndarray[Any, Any], first_iv: int, count: int, ctx: Any) -> None:
        sc = _scratch
        per = max(1, CHUNK // self.sector_size)
        for j in range(0, count, per):
            n = min(per, count - j)
            part = data[j : j + n]
            tw = self._xts_tweaks(first_iv + j * self.iv_step, n, sc)
            x = sc.get("x", part.shape)
            np.bitwise_xor(part, tw, out=x)
            y = sc.get("y", (x.size + 2,))
            ctx.update_into(x.data.cast("B"), y.data.cast("B"))
            np.bitwise_xor(y[: x.size].reshape(part.shape), tw, out=part)

    def _ctr(self, data: np.ndarray[Any, Any], first_iv: int, count: int) -> None:
        # The kernel's ctr() counts the IV as a big-endian 128-bit integer;
        # with plain/plain64 IVs the upper 64 bits (bytes 8..15) start at 0,
        # so block i's counter has be64(i) there.
        ivs = self._ivs(first_iv, count)
        ctr = np.empty_like(data)
        ctr[:, :, 0] = ivs[:, None, 0]
        hi_be = ivs[:, 1].byteswap()[:, None] + np.arange(self.blocks, dtype=U64)[None, :]
        ctr[:, :, 1] = hi_be.byteswap()
        np.bitwise_xor(data, self._ecb_enc(self._data, ctr), out=data)
