"""Shamir recovery: any t points of the polynomial give its value at 0."""

from __future__ import annotations

import itertools
import secrets

import pytest

from nbdluks.unlock.clevis.jose import JoseError
from nbdluks.unlock.clevis.sss import recover

P = (1 << 255) - 19  # a prime of 32 bytes


def shares(secret: int, t: int, n: int) -> list[bytes]:
    coeffs = [secret] + [secrets.randbelow(P) for _ in range(t - 1)]
    out = []
    for x in range(1, n + 1):
        y = sum(c * pow(x, i, P) for i, c in enumerate(coeffs)) % P
        out.append(x.to_bytes(32, "big") + y.to_bytes(32, "big"))
    return out


@pytest.mark.parametrize(("t", "n"), [(1, 1), (1, 3), (2, 3), (3, 5)])
def test_any_t_shares_recover_the_secret(t: int, n: int) -> None:
    secret = secrets.randbelow(P)
    pts = shares(secret, t, n)
    for subset in itertools.combinations(pts, t):
        assert recover(P, 32, subset) == secret.to_bytes(32, "big")


def test_too_few_shares_give_something_else_and_bad_shares_are_refused() -> None:
    secret = secrets.randbelow(P)
    pts = shares(secret, 3, 3)
    assert recover(P, 32, pts[:2]) != secret.to_bytes(32, "big")
    with pytest.raises(JoseError, match="same x"):
        recover(P, 32, [pts[0], pts[0]])
    with pytest.raises(JoseError, match="holds 3 bytes"):
        recover(P, 32, [b"abc"])
