"""LUKS1 header parsing and validation (on-disk spec 1.2.3)."""

from __future__ import annotations

import hashlib
import struct

from .errors import HeaderError, NotLuksError
from .volume import SECTOR, Digest, Keyslot, Pbkdf2, Segment, Volume

MAGIC = b"LUKS\xba\xbe"
PHDR_SIZE = 592
_PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
_SLOT = struct.Struct(">II32sII")
SLOT_ACTIVE = 0x00AC71F3
SLOT_INACTIVE = 0x0000DEAD
NUM_SLOTS = 8
STRIPES = 4000


def _cstr(raw: bytes, what: str) -> str:
    value = raw.split(b"\0", 1)[0]
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise HeaderError(f"LUKS1 {what} is not ASCII") from None


def _hash_name(spec: str) -> str:
    name = spec.lower()
    try:
        hashlib.new(name)
    except ValueError:
        raise HeaderError(f"LUKS1 hash {spec!r} is not available") from None
    return name


def parse(data: bytes) -> Volume:
    if len(data) < PHDR_SIZE:
        raise HeaderError(f"LUKS1 header truncated: {len(data)} of {PHDR_SIZE} bytes")
    (magic, version, cipher_name, cipher_mode, hash_spec, payload_offset, key_bytes,
     mk_digest, mk_salt, mk_iter, uuid) = _PHDR.unpack_from(data)
    if magic != MAGIC:
        raise NotLuksError("not a LUKS header (no LUKS magic)")
    if version != 1:
        raise HeaderError(f"not a LUKS1 header (version {version})")
    cipher = f"{_cstr(cipher_name, 'cipher name')}-{_cstr(cipher_mode, 'cipher mode')}"
    hname = _hash_name(_cstr(hash_spec, "hash spec"))
    if not 1 <= key_bytes <= 512:
        raise HeaderError(f"LUKS1 key size {key_bytes} is out of range")
    if mk_iter == 0:
        raise HeaderError("LUKS1 digest iterations are zero")
    slots = _slots(data, cipher, hname, key_bytes, payload_offset)
    # Without a payload offset (a detached header) the header ends after the
    # last key material.
    end = max((s.area_offset + s.area_size for s in slots), default=PHDR_SIZE)
    metadata = payload_offset * SECTOR if payload_offset else end
    segment = Segment(
        offset=payload_offset * SECTOR, size=None, iv_tweak=0, cipher=cipher, sector_size=SECTOR
    )
    digest = Digest(hname, mk_iter, mk_salt, mk_digest, tuple(s.id for s in slots))
    return Volume(
        version=1, uuid=_cstr(uuid, "uuid"), segment=segment, keyslots=tuple(slots),
        digests=(digest,), key_size=key_bytes, metadata_size=metadata, hash_spec=hname,
    )


def _slots(data: bytes, cipher: str, hname: str, key_bytes: int, payload_offset: int
           ) -> list[Keyslot]:
    """The active key slots, each checked against the header, the payload
    and the others."""
    slots: list[Keyslot] = []
    for i in range(NUM_SLOTS):
        active, iterations, salt, km_offset, stripes = _SLOT.unpack_from(data, 208 + 48 * i)
        if active == SLOT_INACTIVE:
            continue
        if active != SLOT_ACTIVE:
            raise HeaderError(f"LUKS1 key slot {i} has a corrupt state {active:#x}")
        if stripes != STRIPES:
            raise HeaderError(f"LUKS1 key slot {i} has {stripes} stripes (expected {STRIPES})")
        if iterations == 0:
            raise HeaderError(f"LUKS1 key slot {i} has zero iterations")
        size = -(-key_bytes * stripes // SECTOR) * SECTOR
        start = km_offset * SECTOR
        if start < PHDR_SIZE:
            raise HeaderError(f"LUKS1 key slot {i} material overlaps the header")
        if payload_offset and start + size > payload_offset * SECTOR:
            raise HeaderError(f"LUKS1 key slot {i} material runs into the payload")
        for other in slots:
            if start < other.area_offset + other.area_size and other.area_offset < start + size:
                raise HeaderError(f"LUKS1 key slots {other.id} and {i} overlap")
        slots.append(
            Keyslot(
                id=i, kdf=Pbkdf2(hname, iterations, salt), area_offset=start, area_size=size,
                area_cipher=cipher, area_key_size=key_bytes, key_size=key_bytes,
                stripes=stripes, af_hash=hname,
            )
        )
    return slots
