"""LUKS2 header parsing: both binary headers, checksums, the seqid choice,
and the JSON metadata validated before any of it is used (as cryptsetup's
lib/luks2 does)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass, replace
from typing import Any

from . import luks2_json, reencrypt
from .cipher import CipherSpec
from .errors import Argon2MemoryError, HeaderError, LuksError, NotLuksError, UnsupportedError
from .hashes import digest_size
from .kdf import PBKDF2_MAX_ITERATIONS
from .luks2_json import BIN_SIZE
from .reencrypt import Reencryption
from .volume import (
    Argon2,
    Digest,
    Kdf,
    Keyslot,
    Pbkdf2,
    Segment,
    Token,
    UnusableSlot,
    Volume,
)

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
HDR_SIZES = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB
BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ")
CSUM_OFFSET = 448
CSUM_SIZE = 64
SECTOR_SIZES = (512, 1024, 2048, 4096)
DEFAULT_ARGON2_MAX_KIB = 4 * 1024 * 1024  # 4 GiB
# json-c, which cryptsetup parses with, stops at 32 levels of nesting.
MAX_JSON_DEPTH = 31


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
     hdr_offset) = BIN.unpack_from(data, offset)
    if mg != magic:
        raise HeaderError(f"{name} header has no LUKS2 magic")
    if version != 2:
        raise HeaderError(f"{name} header has version {version}")
    if hdr_size not in HDR_SIZES:
        raise HeaderError(f"{name} header size {hdr_size} is invalid")
    if hdr_offset != offset:
        raise HeaderError(f"{name} header claims offset {hdr_offset}, found at {offset}")
    if name == "secondary" and hdr_size != offset:
        raise HeaderError(f"secondary header of size {hdr_size} found at {offset}")
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
    metadata = _json_area(area, name)
    return _Copy(name, offset, hdr_size, seqid, _cstr(label), alg, _cstr(uuid),
                 _cstr(subsystem), metadata)


def _json_area(area: bytes, name: str) -> dict[str, Any]:
    """The JSON object that fills the area: it starts at the first byte, and
    only whitespace, then NULs (at least one), follow it, as cryptsetup requires."""
    if area[:1] != b"{":
        raise HeaderError(f"{name} header JSON area does not start with '{{'")
    text = area.split(b"\0", 1)[0]
    if len(text) == len(area):
        raise HeaderError(f"{name} header JSON area has no terminating NUL")
    if area[len(text):].count(0) != len(area) - len(text):
        raise HeaderError(f"{name} header JSON area holds bytes after the JSON's NUL")
    try:
        decoded = text.decode()
        metadata, end = json.JSONDecoder().raw_decode(decoded)
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderError(f"{name} header JSON is invalid: {e}") from None
    except RecursionError:
        raise HeaderError(f"{name} header JSON is nested too deeply") from None
    if _depth(metadata) > MAX_JSON_DEPTH:
        raise HeaderError(f"{name} header JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    if decoded[end:].strip(" \t\n\r"):  # json-c takes the whitespace, not more
        raise HeaderError(f"{name} header JSON area holds bytes after the JSON object")
    if not isinstance(metadata, dict):
        raise HeaderError(f"{name} header JSON is not an object")
    return metadata


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest (the outermost counts 1); no recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


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
        except (HeaderError, ValueError, TypeError, KeyError, AttributeError,
                AssertionError) as e:  # the last ones: a rule we missed; never a crash
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
    if isinstance(e, HeaderError):
        return str(e)
    # validation should have caught it: still a refusal, never a crash
    return f"metadata not understood ({type(e).__name__}: {e})"


# --- the model: what can be used, per key slot -----------------------------------
#
# luks2_json.validate has checked the structure (every field below exists with
# its JSON type). What remains are values we may not be able to use: they make
# one key slot, one digest or the segment unusable, never the whole header.


def _volume(copy: _Copy, argon2_max_kib: int) -> Volume:
    md = copy.metadata
    luks2_json.validate(md, copy.hdr_size - BIN_SIZE)
    seg_id = min(md["segments"], key=int)
    reenc, why = _reencryption(md)
    segment, unservable = _segment(md, seg_id, reenc is not None or why is not None)
    unservable = unservable or why
    seg_ids = {seg_id} if reenc is None else {s for s in md["segments"] if any(
        f in ("backup-previous", "backup-final") for f in md["segments"][s].get("flags", []))}
    digests, broken = _digests(md["digests"], seg_ids)
    if unservable is None and not digests:
        unservable = "no usable digest covers the data segment" + (
            f" ({'; '.join(broken.values())})" if broken else "")
    slots: list[Keyslot] = []
    unusable: list[UnusableSlot] = []
    for sid, ks in sorted(md["keyslots"].items(), key=lambda kv: int(kv[0])):
        try:
            slots.append(_keyslot(int(sid), ks, md["digests"], digests, broken,
                                  argon2_max_kib))
        except LuksError as e:
            kind = ks["type"] if ks["type"] != "luks2" else ks["kdf"]["type"]
            unusable.append(UnusableSlot(int(sid), kind, e, _priority(ks)))
    config = md["config"]
    metadata_size = 2 * copy.hdr_size + luks2_json.u64(config["keyslots_size"])
    key_sizes = [s.key_size for s in slots]
    return Volume(
        version=2, uuid=copy.uuid, segment=segment, keyslots=tuple(slots),
        digests=tuple(digests), key_size=key_sizes[0] if key_sizes else 0,
        metadata_size=metadata_size, label=copy.label, subsystem=copy.subsystem,
        copy=copy.name, seqid=copy.seqid, checksum_alg=copy.checksum_alg, json=md,
        unusable=tuple(unusable), tokens=_tokens(md["tokens"]), unservable=unservable,
        reencryption=reenc,
    )


def _reencryption(md: dict[str, Any]) -> tuple[Reencryption | None, str | None]:
    """A reencryption in progress, and why it cannot be served (None: it can)."""
    if reencrypt.requirement_version(md) is None:
        return None, None
    try:
        state = reencrypt.parse(md, make_segment)
    except LuksError as e:
        return None, f"it is being reencrypted: {e}"
    if state.crashed:
        return state, ("a step of its reencryption was interrupted (or cryptsetup is running "
                       "it now): cryptsetup repair recovers it before it can be served")
    for p in state.pieces:
        if p.digest is None:
            continue
        if p.segment.sector_size not in SECTOR_SIZES:
            return state, f"a segment has sector size {p.segment.sector_size}"
        try:
            p.segment.cipher_spec()
        except LuksError as e:
            return state, f"a segment: {e}"
    return state, None


def make_segment(seg: dict[str, Any]) -> Segment:
    size_s = seg["size"]
    return Segment(
        offset=luks2_json.u64(seg["offset"]),
        size=None if size_s == "dynamic" else luks2_json.u64(size_s),
        iv_tweak=luks2_json.strtoull(str(seg.get("iv_tweak", "0"))) or 0,
        cipher=seg.get("encryption", ""), sector_size=seg.get("sector_size", 512),
    )


def _segment(md: dict[str, Any], seg_id: str, reencrypting: bool
             ) -> tuple[Segment, str | None]:
    """The data segment, and why it cannot be served (None: it can)."""
    seg = md["segments"][seg_id]
    segment = make_segment(seg)
    sector_size = segment.sector_size
    mandatory = md["config"].get("requirements", {}).get("mandatory", [])
    others = [f for f in mandatory if not f.startswith("online-reencrypt")] if reencrypting \
        else mandatory
    why = None
    if others:
        why = ("it has mandatory requirements this server does not implement: "
               + ", ".join(others))
    elif reencrypting:
        why = None  # the segments are checked with the reencryption (reencrypt.py)
    elif len(md["segments"]) != 1:
        why = (f"it has {len(md['segments'])} segments (reencryption in progress?); only one "
               "crypt segment is supported")
    if why is not None or reencrypting:
        return segment, why
    if seg["type"] != "crypt":
        why = f"segment {seg_id} has type {seg['type']!r}, not crypt"
    elif "integrity" in seg:
        why = f"segment {seg_id} uses dm-integrity ({seg['integrity']['type']}), not supported"
    elif sector_size not in SECTOR_SIZES:
        why = f"segment {seg_id} has sector size {sector_size}, not one of {SECTOR_SIZES}"
    else:
        try:
            segment.cipher_spec()
        except LuksError as e:
            why = f"segment {seg_id}: {e}"
    return segment, why


def _digests(digests_j: dict[str, Any], seg_ids: set[str]
             ) -> tuple[list[Digest], dict[str, str]]:
    """The usable digests of the data segments, and why others are not usable."""
    usable: list[Digest] = []
    broken: dict[str, str] = {}
    for did, d in digests_j.items():
        if not seg_ids & set(d["segments"]):
            continue  # for some other purpose (an unbound key)
        try:
            if d["type"] != "pbkdf2":
                raise UnsupportedError(f"digest type {d['type']!r} is not supported")
            usable.append(Digest(
                _hash(d.get("hash"), f"digest {did} hash"),
                _iterations(d.get("iterations"), f"digest {did} iterations"),
                _b64(d.get("salt"), f"digest {did} salt"),
                _b64(d.get("digest"), f"digest {did} digest"),
                tuple(int(r) for r in d["keyslots"]), did,
            ))
        except LuksError as e:
            broken[did] = f"digest {did}: {e}"
    return usable, broken


def _keyslot(sid: int, ks: dict[str, Any], digests_j: dict[str, Any], usable: list[Digest],
             broken: dict[str, str], argon2_max_kib: int) -> Keyslot:
    """A usable key slot, or the LuksError saying why it is not."""
    where = f"key slot {sid}"
    if ks["type"] != "luks2":
        raise UnsupportedError(f"{where} has type {ks['type']!r}, not supported")
    did = next(d for d, v in digests_j.items() if str(sid) in v["keyslots"])
    if did in broken:
        raise UnsupportedError(f"{where}: {broken[did]}")
    if not any(sid in d.keyslots for d in usable):
        raise UnsupportedError(f"{where} is not bound to the data segment (an unbound key)")
    af, area = ks["af"], ks["area"]
    key_size = _int(ks["key_size"], f"{where} key_size", 1, 512)
    stripes = _int(af["stripes"], f"{where} stripes", 1, 4000)
    a_size = luks2_json.u64(area["size"])
    if a_size < key_size * stripes:
        raise HeaderError(f"{where} area ({a_size} bytes) is too small for its key material")
    spec = CipherSpec.parse(area["encryption"])
    a_key = _int(area["key_size"], f"{where} area key_size", 1, 512)
    spec.check_key_size(a_key)
    return Keyslot(
        id=sid, kdf=_kdf(ks["kdf"], f"{where} kdf", argon2_max_kib),
        area_offset=luks2_json.u64(area["offset"]), area_size=a_size,
        area_cipher=area["encryption"], area_key_size=a_key, key_size=key_size,
        stripes=stripes, af_hash=_hash(af["hash"], f"{where} af hash"),
        priority=_priority(ks),
    )


def _priority(ks: dict[str, Any]) -> int:
    """0 ignore, 1 normal, 2 high; anything else counts as normal (as cryptsetup)."""
    p = ks.get("priority")
    return p if isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 2 else 1


def _tokens(tokens_j: dict[str, Any]) -> tuple[Token, ...]:
    return tuple(
        Token(int(tid), t["type"], tuple(int(k) for k in t["keyslots"]), t)
        for tid, t in sorted(tokens_j.items(), key=lambda kv: int(kv[0]))
    )


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise HeaderError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise HeaderError(f"{what} is not base64")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, or a string that is not ASCII
        raise HeaderError(f"{what} is not base64") from None


def _hash(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise HeaderError(f"{what} is not a string")
    if digest_size(value) is None:
        raise UnsupportedError(f"{what} {value!r} is not an available hash")
    return value


def _iterations(value: Any, what: str) -> int:
    n = _int(value, what, 1, 2**32 - 1)
    if n > PBKDF2_MAX_ITERATIONS:
        raise UnsupportedError(f"{what} {n}: more than PBKDF2 computes here "
                               f"({PBKDF2_MAX_ITERATIONS})")
    return n


def _kdf(k: dict[str, Any], where: str, argon2_max_kib: int) -> Kdf:
    kind = k["type"]
    if kind == "pbkdf2":
        return Pbkdf2(
            _hash(k["hash"], f"{where} hash"),
            _iterations(k["iterations"], f"{where} iterations"),
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
    raise UnsupportedError(f"{where} type {kind!r} is not supported")
