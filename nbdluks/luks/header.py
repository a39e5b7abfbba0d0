"""Recognise and parse a LUKS header of either version."""

from __future__ import annotations

import struct

from . import luks1, luks2
from .errors import HeaderError, NotLuksError
from .volume import Volume


def parse(data: bytes, *, argon2_max_kib: int = luks2.DEFAULT_ARGON2_MAX_KIB) -> Volume:
    """Parse the start of a header device (read up to volume.HEADER_PROBE bytes)."""
    if len(data) < 8:
        raise NotLuksError("too short to hold a LUKS header")
    magic = data[:6]
    if magic == luks1.MAGIC:
        (version,) = struct.unpack_from(">H", data, 6)
        if version == 1:
            return luks1.parse(data)
        if version == 2:
            return luks2.parse(data, argon2_max_kib=argon2_max_kib)
        raise HeaderError(f"unknown LUKS version {version}")
    # A damaged LUKS2 primary may still have its secondary copy.
    return luks2.parse(data, argon2_max_kib=argon2_max_kib)
