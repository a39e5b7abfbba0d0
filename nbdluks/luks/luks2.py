"""LUKS2 header parsing: both binary headers, checksums, the seqid choice,
and the JSON metadata validated before any of it is used (as cryptsetup's
lib/luks2 does)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from dataclasses import dataclass, replace
from typing import Any

from .errors import Argon2MemoryError, HeaderError, NotLuksError, UnsupportedError
from .volume import Argon2, Digest, Kdf, Keyslot, Pbkdf2, Segment, Volume

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
BIN_SIZE = 4096
HDR_SIZES = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB
_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ")
CSUM_OFFSET = 448
CSUM_SIZE = 64
SECTOR_SIZES = (512, 1024, 2048, 4096)
MAX_KEYSLOTS = 32
DEFAULT_ARGON2_MAX_KIB = 4 * 1024 * 1024  # 4 GiB


@dataclass(frozen=True)
class _Copy:
    name: str
    offset: int
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    uuid: str
    subsystem: str
    metadata: dict[str, Any]


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _read_copy(data: bytes, offset: int, magic: bytes, name: str) -> _Copy:
    """One binary header + JSON area at `offset`; HeaderError when unusable."""
    if len(data) < offset + BIN_SIZE:
        raise HeaderError(f"{name} header truncated")
    (mg, version, hdr_size, seqid, label, csum_alg, _salt, uuid, subsystem,
     hdr_offset) = _BIN.unpack_from(data, offset)
    if mg != magic:
        raise HeaderError(f"{name} header has no LUKS2 magic")
    if version != 2:
        raise HeaderError(f"{name} header has version {version}")
    if hdr_size not in HDR_SIZES:
        raise HeaderError(f"{name} header size {hdr_size} is invalid")
    if hdr_offset != offset:
        raise HeaderError(f"{name} header claims offset {hdr_offset}, found at {offset}")
    alg = _cstr(csum_alg)
    try:
        h = hashlib.new(alg)
    except ValueError:
        raise HeaderError(f"{name} header checksum algorithm {alg!r} is unknown") from None
    if len(data) < offset + hdr_size:
        raise HeaderError(f"{name} header truncated")
    binary = bytearray(data[offset : offset + BIN_SIZE])
    stored = bytes(binary[CSUM_OFFSET : CSUM_OFFSET + h.digest_size])
    binary[CSUM_OFFSET : CSUM_OFFSET + CSUM_SIZE] = bytes(CSUM_SIZE)
    h.update(binary)
    area = data[offset + BIN_SIZE : offset + hdr_size]
    h.update(area)
    if h.digest() != stored:
        raise HeaderError(f"{name} header checksum mismatch")
    text = area.split(b"\0", 1)[0]
    try:
        metadata = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderError(f"{name} header JSON is invalid: {e}") from None
    if not isinstance(metadata, dict):
        raise HeaderError(f"{name} header JSON is not an object")
    return _Copy(name, offset, hdr_size, seqid, _cstr(label), alg, _cstr(uuid),
                 _cstr(subsystem), metadata)


def parse(data: bytes, *, argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB) -> Volume:
    if data[:6] not in (MAGIC_PRIMARY, MAGIC_SECONDARY) and not any(
        data[o : o + 6] == MAGIC_SECONDARY for o in HDR_SIZES
    ):
        raise NotLuksError("not a LUKS header (no LUKS magic)")
    errors: list[str] = []
    copies: list[_Copy] = []
    try:
        primary = _read_copy(data, 0, MAGIC_PRIMARY, "primary")
        copies.append(primary)
        secondary_at: tuple[int, ...] = (primary.hdr_size,)
    except HeaderError as e:
        errors.append(str(e))
        secondary_at = HDR_SIZES
    for off in secondary_at:
        if data[off : off + 6] != MAGIC_SECONDARY:
            continue
        try:
            copies.append(_read_copy(data, off, MAGIC_SECONDARY, "secondary"))
            break
        except HeaderError as e:
            errors.append(str(e))
    if not copies:
        raise HeaderError("no usable LUKS2 header: " + "; ".join(errors))
    # A copy with a good checksum but JSON that fails validation does not count.
    candidates = sorted(copies, key=lambda c: (-c.seqid, c.name != "primary"))
    for copy in candidates:
        try:
            vol = _volume(copy, argon2_max_kib)
        except (HeaderError, ValueError, TypeError, KeyError, binascii.Error) as e:
            errors.append(f"{copy.name} header metadata: {_msg(e)}")
            continue
        warnings = []
        if copy.name != "primary" or len(copies) < 2:
            damaged = "primary" if copy.name == "secondary" else "secondary"
            warnings.append(
                f"using the {copy.name} LUKS2 header; the {damaged} copy is damaged"
                f" ({'; '.join(errors) or 'not found'})"
            )
        elif copies[0].seqid != copies[1].seqid:
            warnings.append("LUKS2 header copies differ in seqid; using the newer")
        return replace(vol, warnings=tuple(warnings))
    raise HeaderError("no usable LUKS2 header: " + "; ".join(errors))


def _msg(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"missing field {e.args[0]!r}"
    return str(e)


# --- JSON validation ------------------------------------------------------


def _obj(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent[key]
    if not isinstance(value, dict):
        raise HeaderError(f"{key!r} is not an object")
    return value


def _u64(value: Any, what: str) -> int:
    """LUKS2 stores u64 values as decimal strings."""
    if not isinstance(value, str) or not value.isdigit() or len(value) > 20:
        raise HeaderError(f"{what} is not a u64 string: {value!r}")
    n = int(value)
    if n >= 1 << 64:
        raise HeaderError(f"{what} is out of range")
    return n


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise HeaderError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise HeaderError(f"{what} is not base64")
    return base64.b64decode(value, validate=True)


def _hash(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise HeaderError(f"{what} is not a string")
    try:
        hashlib.new(value)
    except ValueError:
        raise UnsupportedError(f"{what} {value!r} is not an available hash") from None
    return value


def _kdf(k: dict[str, Any], where: str, argon2_max_kib: int) -> Kdf:
    kind = k["type"]
    if kind == "pbkdf2":
        return Pbkdf2(
            _hash(k["hash"], f"{where} hash"),
            _int(k["iterations"], f"{where} iterations", 1, 2**32 - 1),
            _b64(k["salt"], f"{where} salt"),
        )
    if kind in ("argon2i", "argon2id"):
        memory = _int(k["memory"], f"{where} memory", 8, 2**32 - 1)
        if memory > argon2_max_kib:
            raise Argon2MemoryError(where, memory, argon2_max_kib)
        return Argon2(
            kind,
            _int(k["time"], f"{where} time", 1, 2**32 - 1),
            memory,
            _int(k["cpus"], f"{where} cpus", 1, 16),
            _b64(k["salt"], f"{where} salt"),
        )
    raise UnsupportedError(f"{where} uses the unsupported KDF {kind!r}")


@dataclass(frozen=True)
class _Config:
    keyslots_size: int
    metadata_end: int  # both header copies
    area_end: int  # ... and the keyslots area after them


def _volume(copy: _Copy, argon2_max_kib: int) -> Volume:
    md = copy.metadata
    config = _config(copy, _obj(md, "config"))
    segments_j = _obj(md, "segments")
    _obj(md, "tokens")
    seg_id, segment = _segment(segments_j)
    slots = _keyslots(_obj(md, "keyslots"), config, argon2_max_kib)
    digests = _digests(_obj(md, "digests"), {s.id for s in slots}, segments_j, seg_id)
    key_sizes = {s.key_size for s in slots if any(s.id in d.keyslots for d in digests)}
    if len(key_sizes) > 1:
        raise HeaderError("keyslots of the segment disagree on the volume key size")
    return Volume(
        version=2, uuid=copy.uuid, segment=segment, keyslots=tuple(slots),
        digests=tuple(digests), key_size=key_sizes.pop() if key_sizes else 0,
        metadata_size=config.area_end, label=copy.label, subsystem=copy.subsystem,
        copy=copy.name, seqid=copy.seqid, checksum_alg=copy.checksum_alg, json=md,
    )


def _config(copy: _Copy, config: dict[str, Any]) -> _Config:
    json_size = _u64(config["json_size"], "config.json_size")
    if json_size != copy.hdr_size - 4096:
        raise HeaderError(f"config.json_size {json_size} does not match the header size")
    keyslots_size = _u64(config["keyslots_size"], "config.keyslots_size")
    if keyslots_size % 4096:
        raise HeaderError("config.keyslots_size is not 4096-aligned")
    requirements = config.get("requirements", {})
    mandatory = requirements.get("mandatory", []) if isinstance(requirements, dict) else []
    if mandatory:
        raise UnsupportedError(
            "the volume has mandatory requirements this server does not implement: "
            + ", ".join(map(str, mandatory))
        )
    metadata_end = 2 * copy.hdr_size
    return _Config(keyslots_size, metadata_end, metadata_end + keyslots_size)


def _segment(segments_j: dict[str, Any]) -> tuple[str, Segment]:
    if len(segments_j) != 1:
        raise UnsupportedError(
            f"the volume has {len(segments_j)} segments (reencryption in progress?); "
            "only one crypt segment is supported"
        )
    (seg_id, seg), = segments_j.items()
    if not isinstance(seg, dict):
        raise HeaderError(f"segment {seg_id} is not an object")
    if seg.get("type") != "crypt":
        raise UnsupportedError(f"segment {seg_id} has type {seg.get('type')!r}, not crypt")
    if "integrity" in seg:
        raise UnsupportedError(f"segment {seg_id} uses dm-integrity, which is not supported")
    sector_size = seg["sector_size"]
    if sector_size not in SECTOR_SIZES:
        raise HeaderError(f"segment {seg_id} sector_size {sector_size!r} is invalid")
    offset = _u64(seg["offset"], "segment offset")
    if offset % sector_size:
        raise HeaderError(f"segment {seg_id} offset is not aligned to its sector size")
    size_s = seg["size"]
    size = None if size_s == "dynamic" else _u64(size_s, "segment size")
    if size is not None and size % sector_size:
        raise HeaderError(f"segment {seg_id} size is not a multiple of its sector size")
    if not isinstance(seg["encryption"], str):
        raise HeaderError(f"segment {seg_id} encryption is not a string")
    return seg_id, Segment(offset=offset, size=size,
                           iv_tweak=_u64(seg["iv_tweak"], "segment iv_tweak"),
                           cipher=seg["encryption"], sector_size=sector_size)


def _keyslots(keyslots_j: dict[str, Any], config: _Config, argon2_max_kib: int
              ) -> list[Keyslot]:
    slots: list[Keyslot] = []
    for sid, ks in keyslots_j.items():
        if not sid.isdigit() or int(sid) >= MAX_KEYSLOTS:
            raise HeaderError(f"keyslot id {sid!r} is invalid")
        if not isinstance(ks, dict):
            raise HeaderError(f"keyslot {sid} is not an object")
        slot = _keyslot(int(sid), ks, config, argon2_max_kib)
        for other in slots:
            if (slot.area_offset < other.area_offset + other.area_size
                    and other.area_offset < slot.area_offset + slot.area_size):
                raise HeaderError(f"keyslots {other.id} and {sid} overlap")
        slots.append(slot)
    return sorted(slots, key=lambda s: s.id)


def _keyslot(sid: int, ks: dict[str, Any], config: _Config, argon2_max_kib: int) -> Keyslot:
    where = f"keyslot {sid}"
    if ks.get("type") != "luks2":
        raise UnsupportedError(f"{where} has unsupported type {ks.get('type')!r}")
    area = _obj(ks, "area")
    if area.get("type") != "raw":
        raise UnsupportedError(f"{where} area type {area.get('type')!r} is not supported")
    af = _obj(ks, "af")
    if af.get("type") != "luks1":
        raise UnsupportedError(f"{where} AF type {af.get('type')!r} is not supported")
    key_size = _int(ks["key_size"], f"{where} key_size", 1, 512)
    stripes = _int(af["stripes"], f"{where} stripes", 1, 4000)
    a_off = _u64(area["offset"], f"{where} area offset")
    a_size = _u64(area["size"], f"{where} area size")
    if a_off < config.metadata_end or a_off + a_size > config.area_end:
        raise HeaderError(f"{where} area lies outside the keyslots area")
    if a_off % 512 or a_size < key_size * stripes:
        raise HeaderError(f"{where} area is misaligned or too small for its key material")
    if not isinstance(area["encryption"], str):
        raise HeaderError(f"{where} area encryption is not a string")
    return Keyslot(
        id=sid, kdf=_kdf(_obj(ks, "kdf"), f"{where} kdf", argon2_max_kib),
        area_offset=a_off, area_size=a_size, area_cipher=area["encryption"],
        area_key_size=_int(area["key_size"], f"{where} area key_size", 1, 512),
        key_size=key_size, stripes=stripes, af_hash=_hash(af["hash"], f"{where} af hash"),
        priority=_int(ks.get("priority", 1), f"{where} priority", 0, 2),
    )


def _digests(digests_j: dict[str, Any], slot_ids: set[int], segments_j: dict[str, Any],
             seg_id: str) -> list[Digest]:
    """The digests that cover the data segment (others are checked, then left)."""
    digests: list[Digest] = []
    for did, d in digests_j.items():
        if not isinstance(d, dict):
            raise HeaderError(f"digest {did} is not an object")
        if d.get("type") != "pbkdf2":
            raise UnsupportedError(f"digest {did} has unsupported type {d.get('type')!r}")
        refs = d["keyslots"]
        segs = d["segments"]
        if not isinstance(refs, list) or not isinstance(segs, list):
            raise HeaderError(f"digest {did} keyslots/segments are not lists")
        for r in refs:
            if not isinstance(r, str) or not r.isdigit() or int(r) not in slot_ids:
                raise HeaderError(f"digest {did} names a keyslot {r!r} that does not exist")
        for s in segs:
            if s not in segments_j:
                raise HeaderError(f"digest {did} names a segment {s!r} that does not exist")
        if seg_id not in segs:
            continue  # a digest for some other purpose (e.g. an unbound keyslot)
        digests.append(
            Digest(
                _hash(d["hash"], f"digest {did} hash"),
                _int(d["iterations"], f"digest {did} iterations", 1, 2**32 - 1),
                _b64(d["salt"], f"digest {did} salt"),
                _b64(d["digest"], f"digest {did} digest"),
                tuple(int(r) for r in refs),
            )
        )
    if not digests:
        raise HeaderError("no digest covers the data segment")
    return digests
