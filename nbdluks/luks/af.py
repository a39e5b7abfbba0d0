"""The anti-forensic splitter of LUKS: merging the stripes back into the key."""

from __future__ import annotations

import hashlib

import numpy as np


def _diffuse(block: bytearray, hash_name: str) -> bytearray:
    """H applied chunk-wise: chunk i becomes hash(be32(i) || chunk), truncated."""
    size = hashlib.new(hash_name).digest_size
    out = bytearray(len(block))
    for i, pos in enumerate(range(0, len(block), size)):
        chunk = block[pos : pos + size]
        h = hashlib.new(hash_name, i.to_bytes(4, "big"))
        h.update(chunk)
        out[pos : pos + len(chunk)] = h.digest()[: len(chunk)]
    return out


def _xor(a: bytearray, b: bytes | bytearray) -> bytearray:
    x = np.bitwise_xor(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8))
    return bytearray(x.tobytes())


def merge(material: bytes | bytearray, key_size: int, stripes: int, hash_name: str) -> bytearray:
    if len(material) < key_size * stripes:
        raise ValueError("key material shorter than key_size * stripes")
    d = bytearray(key_size)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * key_size : (i + 1) * key_size]), hash_name)
    last = material[(stripes - 1) * key_size : stripes * key_size]
    return _xor(d, last)
