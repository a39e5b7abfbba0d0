"""A LUKS2 volume in the middle of a reencryption, as cryptsetup (2.3.7+)
leaves it on disk: the `online-reencrypt-v2` requirement, a `reencrypt`
key slot (mode, direction, resilience area), the backup segments that hold
the old and new parameters, and regular segments, in logical order, each
served with its own key. Progress is nothing but where the segments end.

What is served here: every mode (reencrypt, encrypt, decrypt) with the
checksum, journal and none resilience, in the clean state (between two
hotzone steps: cryptsetup's on-disk state then matches the segments
exactly). An interrupted step (a segment flagged in-reencryption) needs
cryptsetup's recovery first; data-shift reencryptions are not served.
Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

from .errors import HeaderError, UnsupportedError
from .luks2_json import u64
from .volume import Digest, Segment

RESILIENCES = ("checksum", "journal", "none")


@dataclass(frozen=True)
class Piece:
    """One regular segment: logical bytes [start, start + size) live at
    `segment.offset` on the payload; `digest` names the key (None: linear,
    plaintext)."""

    start: int
    segment: Segment
    digest: str | None


@dataclass(frozen=True)
class Reencryption:
    version: int  # of the online-reencrypt-vN requirement
    mode: str  # reencrypt | encrypt | decrypt
    direction: str  # forward | backward
    resilience: str  # the area type
    old_digest: str | None  # bound to backup-previous (None: encrypt, no old key)
    new_digest: str | None  # bound to backup-final (None: decrypt)
    pieces: tuple[Piece, ...]
    data_offset: int  # backup-final's offset: where a dynamic size is counted from
    crashed: bool  # a hotzone step was interrupted (recovery pending)
    verification: Digest | None
    md: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        ends = {}
        for end, flag in (("from", "backup-previous"), ("to", "backup-final")):
            sid = _flagged(self.md, flag)
            seg = self.md["segments"][sid] if sid is not None else {}
            ends[end] = ({"cipher": seg.get("encryption"), "sector_size": seg.get("sector_size")}
                         if seg.get("type") == "crypt" else {"cipher": None})
        return {**ends, "mode": self.mode, "direction": self.direction,
                "resilience": self.resilience,
                "requirement": f"online-reencrypt-v{self.version}",
                "interrupted_step": self.crashed,
                "segments": [{"start": p.start, "offset": p.segment.offset,
                              "size": "dynamic" if p.segment.size is None else p.segment.size,
                              "key": "new" if p.digest == self.new_digest and p.digest else
                              "old" if p.digest else "none (plaintext)"} for p in self.pieces]}


def requirement_version(md: dict[str, Any]) -> int | None:
    """The online-reencrypt requirement's version (1 for the unversioned
    flag), None when there is none."""
    for flag in md["config"].get("requirements", {}).get("mandatory", []):
        if flag == "online-reencrypt":
            return 1
        if flag.startswith("online-reencrypt-v") and flag[18:].isdigit():
            return int(flag[18:])
    return None


def _flagged(md: dict[str, Any], flag: str) -> str | None:
    return next((sid for sid, s in md["segments"].items() if flag in s.get("flags", [])), None)


def _digest_of_segment(md: dict[str, Any], sid: str | None) -> list[str]:
    if sid is None:
        return []
    return [d for d, v in md["digests"].items() if sid in v["segments"]]


def parse(md: dict[str, Any], segment: Any) -> Reencryption:
    """The reencryption state of validated LUKS2 metadata (`segment` builds a
    Segment from a segment's JSON); UnsupportedError for states not served."""
    version = requirement_version(md)
    if version != 2:
        raise UnsupportedError(
            f"its reencryption has requirement version {version}: only online-reencrypt-v2 is "
            "served (v1 needs cryptsetup repair; v3 is a data-shift decryption)")
    slot = next((k for k in md["keyslots"].values() if k["type"] == "reencrypt"), None)
    if slot is None:
        raise HeaderError("online reencryption without its reencrypt key slot")
    area = slot.get("area", {})
    resilience = area.get("type")
    if resilience not in RESILIENCES:
        raise UnsupportedError(f"its reencryption uses the {resilience!r} resilience: only "
                               f"{', '.join(RESILIENCES)} are served (no data shift)")
    old = _digest_of_segment(md, _flagged(md, "backup-previous"))
    new = _digest_of_segment(md, _flagged(md, "backup-final"))
    final = md["segments"][_flagged(md, "backup-final") or "0"]
    regular = sorted((int(s) for s, v in md["segments"].items() if not any(
        f.startswith("backup-") for f in v.get("flags", []))))
    pieces, start, crashed = [], 0, False
    for i in regular:
        seg_j = md["segments"][str(i)]
        crashed = crashed or "in-reencryption" in seg_j.get("flags", [])
        digests = _digest_of_segment(md, str(i))
        seg = segment(seg_j)
        pieces.append(Piece(start, seg, digests[0] if seg_j["type"] == "crypt" and digests
                            else None))
        if seg.size is not None:
            start += seg.size
    return Reencryption(
        version, str(slot.get("mode")), str(slot.get("direction")), resilience,
        old[0] if old else None, new[0] if new else None, tuple(pieces), u64(final["offset"]),
        crashed, _verification(md, slot), md)


def _verification(md: dict[str, Any], slot: dict[str, Any]) -> Digest | None:
    sid = next(s for s, k in md["keyslots"].items() if k is slot)
    for d in md["digests"].values():
        if sid in d["keyslots"] and d.get("type") == "pbkdf2":
            return Digest(d["hash"], d["iterations"], base64.b64decode(d["salt"]),
                          base64.b64decode(d["digest"]), ())
    return None


# --- the verification digest: cryptsetup's reencrypt_assembly_verification_data ------


def _be64(value: Any) -> bytes:
    return struct.pack(">Q", int(value))


def _segment_bytes(s: dict[str, Any]) -> bytes:
    out: bytes = s["type"].encode() + _be64(s["offset"]) + (
        b"dynamic" if s["size"] == "dynamic" else _be64(s["size"]))
    if s["type"] == "crypt":
        out += _be64(s["iv_tweak"]) + s["encryption"].encode() + struct.pack(">I",
                                                                             s["sector_size"])
    return out


def verification_message(state: Reencryption, old_key: bytes | bytearray | None,
                         new_key: bytes | bytearray | None) -> bytes:
    return message(state.md, state.version, state.old_digest, state.new_digest, old_key,
                   new_key)


def message(md: dict[str, Any], version: int, old_digest: str | None, new_digest: str | None,
            old_key: bytes | bytearray | None, new_key: bytes | bytearray | None) -> bytes:
    """What the verification digest is computed over (all integers big-endian)."""
    slot = next(k for k in md["keyslots"].values() if k["type"] == "reencrypt")
    area = slot["area"]
    msg = bytearray([0x76, 0x30 + version])
    if old_digest is not None and old_key is not None:
        msg += old_key
    if new_digest is not None and new_digest != old_digest and new_key:
        msg += new_key
    msg += (slot["mode"].encode() + slot["direction"].encode() + area["type"].encode()
            + _be64(area["offset"]) + _be64(area["size"]))
    if area["type"] == "checksum":
        msg += area["hash"].encode() + struct.pack(">I", area["sector_size"])
    for flag in ("backup-previous", "backup-final", "backup-moved-segment"):
        sid = _flagged(md, flag)
        if sid is not None:
            msg += _segment_bytes(md["segments"][sid])
    return bytes(msg)


def verify(state: Reencryption, old_key: bytes | bytearray | None,
           new_key: bytes | bytearray | None) -> bool:
    """Whether the keys and the reencryption parameters are what the
    header's verification digest covers (cryptsetup's CVE-2021-4122 check:
    without it, a forged header could turn our writes into decryption)."""
    d = state.verification
    if d is None:
        return False
    got = hashlib.pbkdf2_hmac(d.hash, verification_message(state, old_key, new_key), d.salt,
                              d.iterations, len(d.digest))
    return hmac.compare_digest(got, d.digest)


def logical_size(state: Reencryption, payload_size: int) -> int:
    """The plaintext size: a dynamic last segment runs to the payload's end
    counted from the final data offset (cryptsetup's reencrypt size)."""
    if all(p.segment.size is not None for p in state.pieces):
        return sum(p.segment.size or 0 for p in state.pieces)
    return payload_size - state.data_offset

