"""Recognise and parse a LUKS header of either version."""

from __future__ import annotations

import struct

from . import luks1, luks2
from .errors import HeaderError, NotLuksError
from .volume import HEADER_PROBE, Volume

# What a header device's first read takes: both binary headers' fields.
FIRST_PROBE = 4096


def probe_size(start: bytes) -> int:
    """How much of a header device `parse` needs, judged from its first
    FIRST_PROBE bytes: the LUKS1 header (key material is read when a slot is
    tried), both copies of a LUKS2 header; HEADER_PROBE when unsure (a
    damaged primary's secondary may lie anywhere up to 4 MiB in)."""
    if start[:6] == luks1.MAGIC and len(start) >= 16:
        (version,) = struct.unpack_from(">H", start, 6)
        if version == 1:
            return luks1.PHDR_SIZE
        if version == 2:
            (hdr_size,) = struct.unpack_from(">Q", start, 8)
            if hdr_size in luks2.HDR_SIZES:
                return 2 * int(hdr_size)
    return HEADER_PROBE


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
