from __future__ import annotations

import os

import pytest

from nbdluks.luks import af


def split(key: bytes, stripes: int, hash_name: str) -> bytearray:
    """The inverse of af.merge, with random stripes (as cryptsetup makes them)."""
    out = bytearray()
    d = bytearray(len(key))
    for _ in range(stripes - 1):
        stripe = os.urandom(len(key))
        out += stripe
        d = af._diffuse(af._xor(d, stripe), hash_name)
    return out + af._xor(d, key)


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_size", [16, 32, 64, 65])
def test_split_merge_round_trip(hash_name: str, key_size: int) -> None:
    key = os.urandom(key_size)
    material = split(key, 4000, hash_name)
    assert len(material) == key_size * 4000
    assert af.merge(material, key_size, 4000, hash_name) == key
    damaged = bytearray(material)
    damaged[123] ^= 1  # any bit of any stripe matters
    assert af.merge(damaged, key_size, 4000, hash_name) != key


def test_short_material_is_refused() -> None:
    with pytest.raises(ValueError):
        af.merge(bytes(100), 32, 4000, "sha256")
