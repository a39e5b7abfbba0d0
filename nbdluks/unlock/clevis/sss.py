"""Shamir's secret sharing as clevis's "sss" pin does it: the content key
is the polynomial's value at 0 over GF(p), recovered by Lagrange
interpolation from `t` points, each a big-endian x || y of p's byte length."""

from __future__ import annotations

from collections.abc import Sequence

from .jose import JoseError


def recover(p: int, size: int, points: Sequence[bytes | bytearray]) -> bytearray:
    """The secret (`size` bytes) from the points of distinct shares."""
    xy = []
    for pt in points:
        if len(pt) != 2 * size:
            raise JoseError(f"an sss share holds {len(pt)} bytes, not {2 * size}")
        xy.append((int.from_bytes(pt[:size], "big"), int.from_bytes(pt[size:], "big")))
    if len({x for x, _ in xy}) != len(xy):
        raise JoseError("two sss shares have the same x")
    k = 0
    for i, (xo, yo) in enumerate(xy):
        acc = 1
        for j, (xi, _) in enumerate(xy):
            if i != j:
                acc = acc * (-xi) * pow(xo - xi, -1, p) % p
        k = (k + acc * yo) % p
    return bytearray(k.to_bytes(size, "big"))
