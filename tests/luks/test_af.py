from __future__ import annotations

import hashlib
import os

import pytest

from nbdluks.luks import af


def diffuse(block: bytes, hash_name: str) -> bytes:
    """cryptsetup's diffuse(), written out plainly: chunk i of the block
    becomes hash(be32(i) || chunk), truncated to the chunk."""
    size = hashlib.new(hash_name).digest_size
    return b"".join(
        hashlib.new(hash_name, i.to_bytes(4, "big") + block[pos : pos + size]).digest()
        [: len(block[pos : pos + size])]
        for i, pos in enumerate(range(0, len(block), size)))


def xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """The inverse of af.merge, with random stripes (as cryptsetup makes them)."""
    out = b""
    d = bytes(len(key))
    for _ in range(stripes - 1):
        stripe = os.urandom(len(key))
        out += stripe
        d = diffuse(xor(d, stripe), hash_name)
    return out + xor(d, key)


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


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize("key_size", [16, 32, 64, 65])
def test_our_split_is_what_the_plain_merge_undoes(hash_name: str, key_size: int) -> None:
    key = os.urandom(key_size)
    material = af.split(key, 4000, hash_name)
    assert len(material) == key_size * 4000
    # merged by the plain diffuse above, not by af.merge: shared code proves nothing
    d = bytes(key_size)
    for s in range(3999):
        d = diffuse(xor(d, bytes(material[s * key_size : (s + 1) * key_size])), hash_name)
    assert xor(d, bytes(material[3999 * key_size :])) == key
    assert af.split(key, 4000, hash_name) != material  # the stripes are random
