"""The anti-forensic splitter of LUKS: merging the stripes back into the key.

Stripe by stripe: d = H(d XOR stripe), then key = d XOR last stripe, where H
hashes each digest-sized chunk i of its input as hash(be32(i) || chunk).
4000 stripes of a LUKS1 slot make this the cost of an unlock after the KDF
(and with a fast KDF, of all of it): the loop keeps the per-stripe work to
one integer XOR and a copy of a prepared hash per chunk.
"""

from __future__ import annotations

import hashlib


def merge(material: bytes | bytearray, key_size: int, stripes: int, hash_name: str) -> bytearray:
    if len(material) < key_size * stripes:
        raise ValueError("key material shorter than key_size * stripes")
    size = hashlib.new(hash_name).digest_size
    # Each chunk's hash with its index already in it: copy() is cheaper than new().
    chunks = [(hashlib.new(hash_name, i.to_bytes(4, "big")), pos, min(pos + size, key_size))
              for i, pos in enumerate(range(0, key_size, size))]
    view = memoryview(material)
    d = 0
    for s in range(stripes - 1):
        mixed = (d ^ int.from_bytes(view[s * key_size : (s + 1) * key_size], "big")
                 ).to_bytes(key_size, "big")
        out = bytearray(key_size)
        for prepared, start, end in chunks:
            h = prepared.copy()
            h.update(mixed[start:end])
            out[start:end] = h.digest()[: end - start]
        d = int.from_bytes(out, "big")
    last = int.from_bytes(view[(stripes - 1) * key_size : stripes * key_size], "big")
    return bytearray((d ^ last).to_bytes(key_size, "big"))
