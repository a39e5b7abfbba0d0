"""The structural rules cryptsetup (lib/luks2, 2.6) checks on LUKS2 JSON
metadata before it uses any of it; a header that breaks one is refused as a
whole, as cryptsetup refuses it.

Only structure is checked here. What a valid header may hold that we cannot
use (an unknown KDF, a second segment, an Argon2 cost above our cap) is
decided per key slot or per segment later (luks2.py), so that one unusable
slot never makes a volume unusable.
"""

from __future__ import annotations

from typing import Any

from .errors import HeaderError

# Allowed sizes of one metadata copy (binary header + JSON area).
METADATA_SIZES = tuple(0x4000 << i for i in range(9))  # 16 KiB .. 4 MiB
BIN_SIZE = 4096
MAX_KEYSLOTS_SIZE = 128 * 1024 * 1024
_U64 = 1 << 64
_U32_MAX = (1 << 32) - 1


def _bad(what: str) -> HeaderError:
    return HeaderError(f"LUKS2 metadata: {what}")


# --- cryptsetup's helpers ------------------------------------------------------


def numbered(text: str) -> bool:
    """Only ASCII digits (the empty string too, as cryptsetup's `numbered`)."""
    return all("0" <= c <= "9" for c in text)


def strtoull(text: str) -> int | None:
    """C strtoull(text, &end, 10) with `*end == 0 && !errno`: the number, or None."""
    s = text.lstrip(" \t\n\v\f\r")
    negative = s[:1] == "-"
    if s[:1] in "+-" and s:
        s = s[1:]
    if not s or not numbered(s):
        return None
    n = int(s)
    if n >= _U64:
        return None  # ERANGE
    return (-n) % _U64 if negative else n


def u64(text: str) -> int:
    """A validated numbered u64 string."""
    n = strtoull(text)
    assert n is not None
    return n


def _has(obj: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    """json_contains: obj[key] exists with the given JSON type, or None."""
    if not isinstance(obj, dict) or key not in obj:
        return None
    value = obj[key]
    if kind is int:  # a JSON integer, never a bool
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return value if isinstance(value, kind) else None


def _string(obj: Any, key: str, what: str) -> str:
    """json_contains_string: a non-empty string."""
    value = _has(obj, key, str)
    if not value:
        raise _bad(f"{what} has no {key!r} string")
    return str(value)


def _need(obj: Any, key: str, kind: type, what: str) -> Any:
    value = _has(obj, key, kind)
    if value is None:
        raise _bad(f"{what} has no {key!r} {_KIND_NAMES[kind]}")
    return value


_KIND_NAMES = {dict: "object", list: "array", int: "integer", str: "string"}


def _uint32(value: int) -> bool:
    return 0 <= value <= _U32_MAX


def _string_refs(arr: list[Any], section: dict[str, Any], what: str, names: str) -> None:
    for i, ref in enumerate(arr):
        if not isinstance(ref, str):
            raise _bad(f"{what}: {names}[{i}] is not a string")
        if not isinstance(section.get(ref), dict):
            raise _bad(f"{what} names {names[:-1]} {ref!r}, which does not exist")


def _numbered_keys(section: dict[str, Any], what: str) -> None:
    for key in section:
        if not numbered(key):
            raise _bad(f"{what} id {key!r} is not a number")


# --- the checks, in cryptsetup's order -------------------------------------------


def validate(md: Any, json_area_size: int) -> None:
    """Every rule of LUKS2_hdr_validate; HeaderError naming the first broken one."""
    if not isinstance(md, dict):
        raise _bad("the JSON is not an object")
    _requirements(md)
    _tokens(md)
    _digests(md)
    _segments(md)
    _keyslots(md)
    metadata_size = _config(md)
    _areas(md, metadata_size)
    json_size = strtoull(md["config"]["json_size"])
    if json_size != json_area_size:
        raise _bad(f"config.json_size {json_size} does not match the binary header's "
                   f"JSON area of {json_area_size} bytes")
    _keyslot_contents(md)


def _requirements(md: dict[str, Any]) -> None:
    config = _need(md, "config", dict, "the JSON area")
    if "requirements" not in config:
        return
    req = _need(config, "requirements", dict, "config")
    if "mandatory" not in req:
        return
    flags = _need(req, "mandatory", list, "config.requirements")
    reencrypt = 0
    for flag in flags:
        if not isinstance(flag, str):
            raise _bad("config.requirements.mandatory holds a value that is not a string")
        if flag == "online-reencrypt" or (flag.startswith("online-reencrypt-v")
                                          and flag[18:] and numbered(flag[18:])):
            reencrypt += 1
    if reencrypt > 1:
        raise _bad("more than one online-reencrypt requirement")


def _tokens(md: dict[str, Any]) -> None:
    tokens = _need(md, "tokens", dict, "the JSON area")
    keyslots = md.get("keyslots")
    if not isinstance(keyslots, dict):
        raise _bad("the JSON area has no 'keyslots' object")
    _numbered_keys(tokens, "token")
    for tid, token in tokens.items():
        what = f"token {tid}"
        _string(token, "type", what)
        refs = _need(token, "keyslots", list, what)
        _string_refs(refs, keyslots, what, "keyslots")


def _digests(md: dict[str, Any]) -> None:
    digests = _need(md, "digests", dict, "the JSON area")
    keyslots = _need(md, "keyslots", dict, "the JSON area")
    segments = _need(md, "segments", dict, "the JSON area")
    _numbered_keys(digests, "digest")
    for did, digest in digests.items():
        what = f"digest {did}"
        _string(digest, "type", what)
        _string_refs(_need(digest, "keyslots", list, what), keyslots, what, "keyslots")
        _string_refs(_need(digest, "segments", list, what), segments, what, "segments")


def is_backup(segment: dict[str, Any]) -> bool:
    flags = segment.get("flags")
    return isinstance(flags, list) and any(
        isinstance(f, str) and f.startswith("backup-") for f in flags)


def _segments(md: dict[str, Any]) -> None:
    segments: dict[str, Any] = md["segments"]
    if not segments:
        raise _bad("the segments section is empty")
    _numbered_keys(segments, "segment")
    first_backup = -1
    for sid, seg in segments.items():
        size = _segment_fields(sid, seg)
        i = int(sid)
        if is_backup(seg):
            if first_backup < 0 or i < first_backup:
                first_backup = i
        elif 0 <= first_backup <= i:
            raise _bad(f"regular segment {sid} follows backup segment {first_backup}")
        if seg["type"] == "crypt":
            _crypt_segment(seg, f"segment {sid}", size, md["digests"], sid)
    _segment_layout(md, segments, first_backup)


def _segment_fields(sid: str, seg: Any) -> int:
    """The fields every segment has; its size (0: dynamic)."""
    what = f"segment {sid}"
    _string(seg, "type", what)
    offset_s = _string(seg, "offset", what)
    size_s = _string(seg, "size", what)
    if not numbered(offset_s) or strtoull(offset_s) is None:
        raise _bad(f"{what} offset {offset_s!r} is not a u64 number")
    size = 0
    if size_s != "dynamic":
        if not numbered(size_s) or not strtoull(size_s):
            raise _bad(f"{what} size {size_s!r} is neither a u64 above 0 nor 'dynamic'")
        size = u64(size_s)
    if u64(offset_s) % 512 or size % 512:
        raise _bad(f"{what} offset or size is not aligned to 512 bytes")
    if "flags" in seg:
        flags = _need(seg, "flags", list, what)
        if not all(isinstance(f, str) for f in flags):
            raise _bad(f"{what} flags holds a value that is not a string")
    return size


def _crypt_segment(seg: dict[str, Any], what: str, size: int, digests: dict[str, Any],
                   sid: str) -> None:
    iv_tweak = _string(seg, "iv_tweak", what)
    _string(seg, "encryption", what)
    sector_size = _need(seg, "sector_size", int, what)
    if "integrity" in seg:
        integrity = _need(seg, "integrity", dict, what)
        for key in ("type", "journal_encryption", "journal_integrity"):
            _string(integrity, key, f"{what} integrity")
    if not _uint32(sector_size) or not sector_size or sector_size % 512:
        raise _bad(f"{what} sector_size {sector_size} is invalid")
    if not numbered(iv_tweak) or strtoull(iv_tweak) is None:
        raise _bad(f"{what} iv_tweak {iv_tweak!r} is not a u64 number")
    if size % sector_size:
        raise _bad(f"{what} size is not a multiple of its sector size")
    if not any(isinstance(d, dict) and isinstance(d.get("segments"), list)
               and sid in d["segments"] for d in digests.values()):
        raise _bad(f"crypt {what} is not assigned to a key digest")


def _segment_layout(md: dict[str, Any], segments: dict[str, Any], first_backup: int) -> None:
    count = len(segments)
    if first_backup == 0:
        raise _bad("no regular segment")
    if first_backup >= count:
        raise _bad(f"a gap between the last regular segment and backup {first_backup}")
    regular = count if first_backup < 0 else first_backup
    intervals = []
    for i in range(count):
        seg = segments.get(str(i))
        if seg is None:
            raise _bad(f"a gap at segment {i}")
        if i < regular:
            size = 0 if seg["size"] == "dynamic" else u64(seg["size"])
            intervals.append((u64(seg["offset"]), size or None))
    for i, (off, length) in enumerate(intervals):
        if length is None and i != len(intervals) - 1:
            raise _bad("only the last regular segment may have a 'dynamic' size")
        if length is not None and off + length >= _U64:
            raise _bad(f"segment {i} ends beyond 2^64")
        for j, (o2, l2) in enumerate(intervals):
            if i != j and off >= o2 and (l2 is None or off < o2 + l2):
                raise _bad(f"segments {j} and {i} overlap")
    _reencrypt_backups(md, segments, regular)


def _reencrypt_backups(md: dict[str, Any], segments: dict[str, Any], regular: int) -> None:
    mandatory = md["config"].get("requirements", {}).get("mandatory", [])
    if not any(f == "online-reencrypt" or f.startswith("online-reencrypt-v")
               for f in mandatory):
        return
    backups = [segments[str(i)] for i in range(regular, len(segments))]
    final = next((s for s in backups if "backup-final" in s.get("flags", [])), None)
    previous = next((s for s in backups if "backup-previous" in s.get("flags", [])), None)
    if final is None or previous is None:
        raise _bad("online reencryption without its backup segments")


def _keyslots(md: dict[str, Any]) -> None:
    keyslots: dict[str, Any] = md["keyslots"]
    _numbered_keys(keyslots, "keyslot")
    for kid, ks in keyslots.items():
        what = f"keyslot {kid}"
        _string(ks, "type", what)
        if not _uint32(_need(ks, "key_size", int, what)):
            raise _bad(f"{what} key_size is out of range")


def _config(md: dict[str, Any]) -> int:
    """The size of one metadata copy."""
    config = md["config"]
    json_size = strtoull(_string(config, "json_size", "config"))
    if json_size is None:
        raise _bad("config.json_size is not a number")
    keyslots_size = strtoull(_string(config, "keyslots_size", "config"))
    if keyslots_size is None:
        raise _bad("config.keyslots_size is not a number")
    metadata_size = (json_size + BIN_SIZE) % _U64
    if metadata_size not in METADATA_SIZES:
        raise _bad(f"unsupported metadata size {metadata_size}")
    if keyslots_size % 4096 or keyslots_size > MAX_KEYSLOTS_SIZE:
        raise _bad(f"unsupported keyslots area size {keyslots_size}")
    offsets = [u64(s["offset"]) for s in md["segments"].values() if not is_backup(s)]
    first = min(offsets)
    if first and (first < keyslots_size or first - keyslots_size < 2 * metadata_size):
        raise _bad(f"the keyslots area ({keyslots_size} bytes after two {metadata_size}-byte "
                   f"metadata copies) runs into the data at {first}")
    if "flags" in config:
        flags = _need(config, "flags", list, "config")
        if not all(isinstance(f, str) for f in flags):
            raise _bad("config.flags holds a value that is not a string")
    return metadata_size


def _areas(md: dict[str, Any], metadata_size: int) -> None:
    keyslots: dict[str, Any] = md["keyslots"]
    end = 2 * metadata_size + u64(md["config"]["keyslots_size"])
    spans = []
    for kid, ks in keyslots.items():
        what = f"keyslot {kid} area"
        area = _need(ks, "area", dict, f"keyslot {kid}")
        _string(area, "type", what)
        off_s, len_s = _string(area, "offset", what), _string(area, "size", what)
        if not (numbered(off_s) and numbered(len_s)) or None in (strtoull(off_s),
                                                                   strtoull(len_s)):
            raise _bad(f"{what} offset/size are not u64 numbers")
        spans.append((kid, u64(off_s), u64(len_s)))
    for kid, off, length in spans:
        if off < 2 * metadata_size:
            raise _bad(f"keyslot {kid} area at {off} lies inside the metadata")
        if not length:
            raise _bad(f"keyslot {kid} area is empty")
        if off + length >= _U64:
            raise _bad(f"keyslot {kid} area ends beyond 2^64")
        if off + length > end:
            raise _bad(f"keyslot {kid} area ends beyond the keyslots area (at {end})")
        for other, o2, l2 in spans:
            if other != kid and o2 <= off < o2 + l2:
                raise _bad(f"keyslot areas {other} and {kid} overlap")


_KDF_FIELDS = {"pbkdf2": {"hash": str, "iterations": int, "salt": str},
               "argon2i": {"time": int, "memory": int, "cpus": int, "salt": str}}
_KDF_FIELDS["argon2id"] = _KDF_FIELDS["argon2i"]
_AREA_FIELDS = {"encryption": str, "key_size": int, "offset": str, "size": str}


def _keyslot_contents(md: dict[str, Any]) -> None:
    """The checks of the "luks2" keyslot handler; other types have none we
    know (cryptsetup skips types it has no handler for)."""
    digests = md["digests"]
    for kid, ks in md["keyslots"].items():
        if ks["type"] != "luks2":
            continue
        what = f"keyslot {kid}"
        kdf = _need(ks, "kdf", dict, what)
        af = _need(ks, "af", dict, what)
        area = _need(ks, "area", dict, what)
        kdf_type = _string(kdf, "type", f"{what} kdf")
        # Unknown KDF types are structurally fine (unusable, decided later);
        # extra fields of known ones are dropped by cryptsetup's repair.
        for key, kind in _KDF_FIELDS.get(kdf_type, {}).items():
            if kind is str:
                _string(kdf, key, f"{what} kdf")
            else:
                _need(kdf, key, kind, f"{what} kdf")
        if _string(af, "type", f"{what} af") != "luks1":
            raise _bad(f"{what} af type {af['type']!r} is unknown")
        _string(af, "hash", f"{what} af")
        _need(af, "stripes", int, f"{what} af")
        if _string(area, "type", f"{what} area") != "raw":
            raise _bad(f"{what} area type {area['type']!r} is unknown")
        for key, kind in _AREA_FIELDS.items():
            if kind is str:
                _string(area, key, f"{what} area")
            else:
                _need(area, key, kind, f"{what} area")
        bound = sum(1 for d in digests.values() if kid in d["keyslots"])
        if bound != 1:
            raise _bad(f"{what} is assigned to {bound} digests, not exactly 1")
