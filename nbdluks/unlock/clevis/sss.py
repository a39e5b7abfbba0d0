"""Shamir's secret sharing as clevis's "sss" pin does it: the content key
is the polynomial's value at 0 over GF(p), recovered by Lagrange
interpolation from `t` points, each a big-endian x || y of p's byte length.
The pin's settings come from outside and are checked before use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .jose import JoseError, b64d

# Pins in one sss pin: clevis binds a handful; a header asking for
# thousands is refused rather than asked.
MAX_PINS = 16
# p has the content key's size (at most 32 bytes for A256GCM); a larger one
# would only cost time.
MAX_PRIME_BYTES = 64


@dataclass(frozen=True)
class Config:
    """An sss pin's settings: `t` of the nested pins' JWEs, over GF(p)."""

    t: int
    p: int
    size: int  # bytes of p, of the secret, and of each of a point's x and y
    jwes: tuple[Any, ...]

    @classmethod
    def from_header(cls, clevis: dict[str, Any]) -> Config:
        cfg = clevis.get("sss")
        if not isinstance(cfg, dict) or not isinstance(cfg.get("jwe"), list) or not cfg["jwe"]:
            raise JoseError("no nested pins")
        jwes, t = cfg["jwe"], cfg.get("t")
        if len(jwes) > MAX_PINS:
            raise JoseError(f"{len(jwes)} nested pins, more than the {MAX_PINS} allowed")
        if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= len(jwes):
            raise JoseError(f"the threshold is not a number from 1 to {len(jwes)}")
        prime = b64d(cfg.get("p"))
        p = int.from_bytes(prime, "big")
        if not 1 <= len(prime) <= MAX_PRIME_BYTES or p < 3:
            raise JoseError(f"the prime p ({len(prime)} bytes) is empty, too small or "
                            "too large")
        return cls(t, p, len(prime), tuple(jwes))


def recover(p: int, size: int, points: Sequence[bytes | bytearray]) -> bytearray:
    """The secret (`size` bytes) from the points of distinct shares."""
    if p < 3 or size < 1 or p.bit_length() > 8 * size:
        raise JoseError("the sss prime is too small or does not fit its size")
    xy = []
    for pt in points:
        if len(pt) != 2 * size:
            raise JoseError(f"an sss share holds {len(pt)} bytes, not {2 * size}")
        xy.append((int.from_bytes(pt[:size], "big"), int.from_bytes(pt[size:], "big")))
    if len({x % p for x, _ in xy}) != len(xy):
        raise JoseError("two sss shares have the same x")
    k = 0
    for i, (xo, yo) in enumerate(xy):
        acc = 1
        for j, (xi, _) in enumerate(xy):
            if i != j:
                try:
                    inverse = pow(xo - xi, -1, p)
                except ValueError:  # p is not prime
                    raise JoseError("the sss modulus p is not a prime") from None
                acc = acc * (-xi) * inverse % p
        k = (k + acc * yo) % p
    return bytearray(k.to_bytes(size, "big"))
