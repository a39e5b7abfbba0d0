"""The anti-forensic splitter of LUKS: a key split into stripes, and the
stripes merged back into the key.

Stripe by stripe: d = H(d XOR stripe), then key = d XOR last stripe, where H
hashes each digest-sized chunk i of its input as hash(be32(i) || chunk).
4000 stripes of a LUKS1 slot make this the cost of an unlock after the KDF
(and with a fast KDF, of all of it): the loop keeps the per-stripe work to
one integer XOR and a copy of a prepared hash per chunk.
"""

from __future__ import annotations

import hashlib
import secrets


def _chunks(key_size: int, hash_name: str) -> list[tuple[hashlib._Hash, int, int]]:
    """Each chunk's hash with its index already in it: copy() is cheaper than new()."""
    size = hashlib.new(hash_name).digest_size
    return [(hashlib.new(hash_name, i.to_bytes(4, "big")), pos, min(pos + size, key_size))
            for i, pos in enumerate(range(0, key_size, size))]


def split(key: bytes | bytearray, stripes: int, hash_name: str) -> bytearray:
    """key_size * stripes bytes: stripes-1 random ones (from the OS's CSPRNG),
    then the last chosen so that `merge` gives the key back."""
    key_size = len(key)
    chunks = _chunks(key_size, hash_name)
    material = bytearray(secrets.token_bytes(key_size * (stripes - 1)))
    d = _fold(material, key_size, stripes - 1, chunks)
    material += (d ^ int.from_bytes(key, "big")).to_bytes(key_size, "big")
    return material


def _fold(material: bytes | bytearray, key_size: int, stripes: int,
          chunks: list[tuple[hashlib._Hash, int, int]]) -> int:
    """d after `stripes` stripes: d = H(d XOR stripe), from d = 0."""
    with memoryview(material) as view:
        d = 0
        for s in range(stripes):  # one loop, no calls: this is an unlock's cost
            mixed = (d ^ int.from_bytes(view[s * key_size : (s + 1) * key_size], "big")
                     ).to_bytes(key_size, "big")
            out = bytearray(key_size)
            for prepared, start, end in chunks:
                h = prepared.copy()
                h.update(mixed[start:end])
                out[start:end] = h.digest()[: end - start]
            d = int.from_bytes(out, "big")
    return d


def merge(material: bytes | bytearray, key_size: int, stripes: int, hash_name: str) -> bytearray:
    if len(material) < key_size * stripes:
        raise ValueError("key material shorter than key_size * stripes")
    d = _fold(material, key_size, stripes - 1, _chunks(key_size, hash_name))
    last = int.from_bytes(material[(stripes - 1) * key_size : stripes * key_size], "big")
    return bytearray((d ^ last).to_bytes(key_size, "big"))
