"""Sector ciphers as dm-crypt defines them, computed in bulk.

A request of many sectors is a handful of vectorized operations, never a
cipher context per sector (modes.py, xts.py). Like dm-crypt at table setup,
a SectorCipher resolves its spec once, when it is built: the IV generator
by name (ivgen.py), the mode by name (_MODES below) and, for XTS, the engine
that does the work (engines.py). AES-XTS goes through libcrypto's EVP one
unit at a time wherever OpenSSL takes the key: for every request when the C
helper (_xtsloop.c) is built, else through ctypes for the requests too short
for numpy to catch up, by the measured table engines.EVP_MAX_UNITS. numpy
does the rest, and every other cipher. A call then goes straight to that
implementation: no names are compared per request.

16-byte blocks are handled as pairs of little-endian uint64 (lo, hi).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from ..block import Decrypt
from . import engines
from .ecb import BLOCK_CIPHERS, Ecb
from .errors import UnsupportedError
from .hashes import digest_size
from .ivgen import NAMES, IvGen
from .ivgen import make as make_ivgen
from .modes import Buffer, Cbc, Ctr, EcbMode, Mode

IVGENS = NAMES  # from ivgen.py's table, as MODES is from _MODES below
_REFUSED = ("serpent", "twofish", "cast5", "cast6", "blowfish", "des3_ede", "des")
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
        if cipher not in BLOCK_CIPHERS or len(parts) < 2:
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
            if not ivhash or not digest_size(ivhash):  # unknown, or shake (no fixed size)
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
        sizes = BLOCK_CIPHERS[self.cipher][1]
        per = key_bytes // 2 if self.mode == "xts" else key_bytes
        if (self.mode == "xts" and key_bytes % 2) or per not in sizes:
            raise UnsupportedError(
                f"{key_bytes}-byte key is not valid for {self}"
                f" (block cipher keys: {', '.join(map(str, sizes))} bytes"
                f"{', doubled for xts' if self.mode == 'xts' else ''})"
            )


# (spec, key, IV generator, sector size, engine or None) -> the mode, ready
_Build: TypeAlias = "Callable[[CipherSpec, bytes | bytearray, IvGen, int, str | None], Mode]"


def _xts(spec: CipherSpec, key: bytes | bytearray, ivs: IvGen, sector_size: int,
         engine: str | None) -> Mode:
    return engines.xts(spec.cipher, key, ivs, sector_size, engine)


def _numpy_only(mode: type[Cbc | EcbMode | Ctr]) -> _Build:
    def build(spec: CipherSpec, key: bytes | bytearray, ivs: IvGen, sector_size: int,
              engine: str | None) -> Mode:
        if engine not in (None, "numpy"):
            raise ValueError(f"the {engine} engine cannot do {spec}")
        return mode(Ecb(spec.cipher, key), ivs, sector_size)
    return build


# mode name -> its implementation, built for a key
_MODES: dict[str, _Build] = {
    "xts": _xts, "cbc": _numpy_only(Cbc), "ecb": _numpy_only(EcbMode), "ctr": _numpy_only(Ctr),
}
MODES = tuple(_MODES)


class SectorCipher:
    """Encrypts and decrypts runs of whole data units in place.

    `first_iv` is the IV sector number of the first unit; each further unit
    adds `iv_step` (sector_size / 512 for dm-crypt without iv_large_sectors).
    `engine` (for tests and the bench) forces one of engines.ENGINES for
    XTS; by default the fastest here does the work.
    """

    encrypt: Callable[[Buffer, int], None]
    decrypt: Callable[[Buffer, int], None]
    direct: Callable[[int], Decrypt | None]  # see Mode.direct
    engine: str  # what does the work, for the log

    def __init__(self, spec: CipherSpec, key: bytes | bytearray, sector_size: int = 512,
                 iv_step: int | None = None, *, engine: str | None = None) -> None:
        spec.check_key_size(len(key))
        if sector_size % 16 or sector_size < 16:
            raise UnsupportedError(f"sector size {sector_size} is not a multiple of 16")
        self.spec = spec
        self.sector_size = sector_size
        self.iv_step = sector_size // 512 if iv_step is None else iv_step
        self.blocks = sector_size // 16
        ivs = make_ivgen(spec.ivgen, spec.ivhash, spec.cipher, key, self.iv_step)
        self._mode = _MODES[spec.mode](spec, key, ivs, sector_size, engine)
        self.engine = self._mode.engine
        # Bound once: a call goes straight to the chosen implementation.
        self.encrypt = self._mode.encrypt
        self.decrypt = self._mode.decrypt
        self.direct = self._mode.direct
