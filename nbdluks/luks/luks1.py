"""LUKS1 header parsing and validation (on-disk spec 1.2.3)."""

from __future__ import annotations

import itertools
import struct

from .cipher import CipherSpec
from .errors import HeaderError, LuksError, NotLuksError, UnsupportedError
from .hashes import digest_size
from .kdf import PBKDF2_MAX_ITERATIONS
from .volume import SECTOR, Digest, Keyslot, Pbkdf2, Segment, UnusableSlot, Volume

MAGIC = b"LUKS\xba\xbe"
PHDR_SIZE = 592
PHDR = struct.Struct(">6sH32s32s32sII20s32sI40s")
SLOT = struct.Struct(">II32sII")
SLOTS_AT = 208  # the first of the 48-byte key slot records
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


# Hashes cryptsetup (libgcrypt) knows that Python's hashlib may lack: a
# volume using one is valid, but we cannot open it.
_FOREIGN_HASHES = ("whirlpool", "ripemd160", "stribog256", "stribog512", "sm3")
_DIGEST_SIZE = 20  # LUKS_DIGESTSIZE: a hash with shorter output is refused


def _hash_name(spec: str) -> tuple[str, str | None]:
    """The hash's name, and why we cannot use it (None: we can)."""
    name = spec.lower()
    size = digest_size(name)
    if size is None:
        if name in _FOREIGN_HASHES:
            return name, f"the hash {spec!r} is not available here"
        raise HeaderError(f"LUKS1 hash {spec!r} is not supported")
    if size < _DIGEST_SIZE:
        raise HeaderError(f"LUKS1 hash {spec!r} is too short ({size} bytes)")
    return name, None


def parse(data: bytes) -> Volume:
    if len(data) < PHDR_SIZE:
        raise HeaderError(f"LUKS1 header truncated: {len(data)} of {PHDR_SIZE} bytes")
    (magic, version, cipher_name, cipher_mode, hash_spec, payload_offset, key_bytes,
     mk_digest, mk_salt, mk_iter, uuid) = PHDR.unpack_from(data)
    if magic != MAGIC:
        raise NotLuksError("not a LUKS header (no LUKS magic)")
    if version != 1:
        raise HeaderError(f"not a LUKS1 header (version {version})")
    cipher = f"{_cstr(cipher_name, 'cipher name')}-{_cstr(cipher_mode, 'cipher mode')}"
    hname, unservable = _hash_name(_cstr(hash_spec, "hash spec"))
    raw = [SLOT.unpack_from(data, SLOTS_AT + 48 * i) for i in range(NUM_SLOTS)]
    _check_areas(raw, key_bytes, payload_offset)
    if unservable is None:
        unservable = _unservable(cipher, key_bytes, mk_iter)
    slots, unusable = _slots(raw, cipher, hname, key_bytes)
    # The header ends after the last slot's key material, active or not
    # (cryptsetup's LUKS_device_sectors): a luksHeaderBackup holds that much,
    # less than an attached payload's offset.
    metadata = max(r[3] + -(-key_bytes * STRIPES // SECTOR) for r in raw) * SECTOR
    segment = Segment(
        offset=payload_offset * SECTOR, size=None, iv_tweak=0, cipher=cipher, sector_size=SECTOR
    )
    digest = Digest(hname, mk_iter, mk_salt, mk_digest, tuple(s.id for s in slots))
    return Volume(
        version=1, uuid=_cstr(uuid, "uuid"), segment=segment, keyslots=tuple(slots),
        digests=(digest,), key_size=key_bytes, metadata_size=metadata, hash_spec=hname,
        unusable=tuple(unusable), unservable=unservable,
    )


def _unservable(cipher: str, key_bytes: int, mk_iter: int) -> str | None:
    if not 1 <= key_bytes <= 512:
        return f"its key size of {key_bytes} bytes is out of range"
    if mk_iter == 0:
        return "its volume key digest has zero iterations"
    if mk_iter > PBKDF2_MAX_ITERATIONS:
        return (f"its volume key digest has {mk_iter} iterations: more than PBKDF2 "
                f"computes here ({PBKDF2_MAX_ITERATIONS})")
    try:
        CipherSpec.parse(cipher).check_key_size(key_bytes)
    except LuksError as e:
        return str(e)
    return None


def _check_areas(raw: list[tuple[int, int, bytes, int, int]], key_bytes: int,
                 payload_offset: int) -> None:
    """cryptsetup's rules for every slot, active or not: 4000 stripes, key
    material after the header, before the payload, not overlapping."""
    sectors = -(-key_bytes * STRIPES // SECTOR)
    for i, (_, _, _, km_offset, stripes) in enumerate(raw):
        if stripes != STRIPES:
            raise HeaderError(f"LUKS1 key slot {i} has {stripes} stripes (must be {STRIPES})")
        if km_offset * SECTOR < PHDR_SIZE:
            raise HeaderError(f"LUKS1 key slot {i} material overlaps the header")
        if payload_offset and (payload_offset <= km_offset
                               or payload_offset < km_offset + sectors):
            raise HeaderError(f"LUKS1 key slot {i} material runs into the payload")
    order = sorted(range(NUM_SLOTS), key=lambda i: raw[i][3])
    for prev, nxt in itertools.pairwise(order):
        if raw[nxt][3] < raw[prev][3] + sectors:
            raise HeaderError(f"LUKS1 key slots {prev} and {nxt} overlap")


def _slots(raw: list[tuple[int, int, bytes, int, int]], cipher: str, hname: str,
           key_bytes: int) -> tuple[list[Keyslot], list[UnusableSlot]]:
    """The active key slots, and those in a state we cannot use."""
    slots: list[Keyslot] = []
    unusable: list[UnusableSlot] = []
    for i, (active, iterations, salt, km_offset, stripes) in enumerate(raw):
        if active == SLOT_INACTIVE:
            continue
        if active != SLOT_ACTIVE:
            unusable.append(UnusableSlot(i, "pbkdf2", HeaderError(
                f"LUKS1 key slot {i} has a corrupt state {active:#x}")))
            continue
        if iterations == 0:
            unusable.append(UnusableSlot(i, "pbkdf2", HeaderError(
                f"LUKS1 key slot {i} has zero iterations")))
            continue
        if iterations > PBKDF2_MAX_ITERATIONS:
            unusable.append(UnusableSlot(i, "pbkdf2", UnsupportedError(
                f"LUKS1 key slot {i} has {iterations} iterations: more than PBKDF2 "
                f"computes here ({PBKDF2_MAX_ITERATIONS})")))
            continue
        slots.append(
            Keyslot(
                id=i, kdf=Pbkdf2(hname, iterations, salt), area_offset=km_offset * SECTOR,
                area_size=-(-key_bytes * stripes // SECTOR) * SECTOR, area_cipher=cipher,
                area_key_size=key_bytes, key_size=key_bytes, stripes=stripes, af_hash=hname,
            )
        )
    return slots, unusable
