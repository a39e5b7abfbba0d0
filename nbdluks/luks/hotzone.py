"""One step of a reencryption after another, in cryptsetup's on-disk terms
(forward, mode reencrypt, no data shift): where the next hotzone is, the
segments the header holds while it is rewritten ("hot") and after ("post"),
and how an interrupted step is recovered from its resilience area.

Progress is nothing but where the segments end. Bytes [0, done) of the
plaintext are under the new key at backup-final's parameters, bytes past
the hotzone under the old key at backup-previous's; the hotzone segment has
the new parameters, the flag `in-reencryption` and both keys' digests.
Pure: metadata in, metadata out; the caller performs every read and write.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import HeaderError, UnsupportedError
from .luks2_json import u64
from .reencrypt import Reencryption
from .volume import SECTOR

IN_REENCRYPTION = "in-reencryption"


@dataclass(frozen=True)
class Zone:
    """Logical bytes [start, start + length) of the plaintext."""

    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


def backup(md: dict[str, Any], flag: str) -> dict[str, Any]:
    return next(s for s in md["segments"].values() if flag in s.get("flags", []))


def _segment(base: dict[str, Any], offset: int, size: int | None, iv: int,
             flags: list[str] | None = None) -> dict[str, Any]:
    out = {k: v for k, v in base.items() if k != "flags"}
    out.update(offset=str(offset), size="dynamic" if size is None else str(size))
    if out["type"] == "crypt":
        out["iv_tweak"] = str(iv)
    if flags:
        out["flags"] = flags
    return out


def supported(state: Reencryption) -> None:
    """What nbdluks moves on itself; cryptsetup does the rest."""
    if (state.mode, state.direction) != ("reencrypt", "forward"):
        raise UnsupportedError(f"a {state.direction} {state.mode} is finished by cryptsetup "
                               "(nbdluks moves on forward reencryptions of the key)")
    if state.old_digest is None or state.new_digest is None or \
            state.old_digest == state.new_digest:
        raise UnsupportedError("the reencryption keeps its volume key: finished by cryptsetup")
    prev, final = backup(state.md, "backup-previous"), backup(state.md, "backup-final")
    if prev["type"] != "crypt" or final["type"] != "crypt" or prev["offset"] != final["offset"]:
        raise UnsupportedError("the reencryption moves the data: finished by cryptsetup")


def alignment(state: Reencryption, block_size: int = SECTOR) -> int:
    """The unit of every boundary: the checksum block, or the largest sector
    size in play (cryptsetup's reencrypt_get_alignment)."""
    area = _area(state.md)
    if area["type"] == "checksum":
        return int(area["sector_size"])
    return max(block_size, int(backup(state.md, "backup-previous")["sector_size"]),
               int(backup(state.md, "backup-final")["sector_size"]))


def _area(md: dict[str, Any]) -> dict[str, Any]:
    slot = next(k for k in md["keyslots"].values() if k["type"] == "reencrypt")
    return slot["area"]  # type: ignore[no-any-return]


def capacity(state: Reencryption, limit: int) -> int:
    """The longest hotzone the resilience can protect, at most `limit` bytes."""
    area = _area(state.md)
    size = u64(area["size"])
    if area["type"] == "checksum":
        limit = min(limit, size // hashlib.new(area["hash"]).digest_size
                    * int(area["sector_size"]))
    elif area["type"] == "journal":
        limit = min(limit, size)
    align = alignment(state)
    limit -= limit % align
    if limit <= 0:
        raise HeaderError("the reencryption's resilience area holds no whole block")
    return limit


def done(state: Reencryption, size: int) -> int:
    """Bytes already under the new key, in the clean state."""
    if state.crashed:
        raise HeaderError("a step was interrupted: it is recovered first")
    pieces = state.pieces
    if len(pieces) == 1:
        return size if pieces[0].digest == state.new_digest else 0
    if len(pieces) != 2 or pieces[0].digest != state.new_digest or \
            pieces[1].digest != state.old_digest or pieces[0].segment.size is None:
        raise HeaderError("the reencryption's segments are not a forward reencryption's")
    return pieces[0].segment.size


def hotzone(state: Reencryption) -> Zone:
    """The zone of an interrupted step."""
    piece = next(p for i, p in enumerate(state.pieces) if IN_REENCRYPTION in
                 _regular(state.md)[i].get("flags", []))
    if piece.segment.size is None:
        raise HeaderError("the interrupted hotzone has no fixed size")
    return Zone(piece.start, piece.segment.size)


def next_zone(start: int, size: int, longest: int) -> Zone | None:
    return Zone(start, min(longest, size - start)) if start < size else None


def _regular(md: dict[str, Any]) -> list[dict[str, Any]]:
    return [md["segments"][sid] for sid in sorted(md["segments"], key=int)
            if not any(f.startswith("backup-") for f in md["segments"][sid].get("flags", []))]


def layout(state: Reencryption, size: int, finished: int, hot: int = 0) -> dict[str, Any]:
    """The metadata with [0, finished) new, a hotzone of `hot` bytes after
    it (0: none, the clean state) and the rest old; `size` is the plaintext's."""
    md = copy.deepcopy(state.md)
    prev, final = backup(md, "backup-previous"), backup(md, "backup-final")
    base = u64(final["offset"])
    dynamic = prev["size"] == "dynamic"
    regular: list[tuple[dict[str, Any], list[str]]] = []
    old, new = state.old_digest, state.new_digest
    assert old is not None and new is not None
    if finished:
        regular.append((_segment(final, base, finished, 0), [new]))
    after = finished + hot
    if hot:
        regular.append((_segment(final, base + finished, hot, finished // SECTOR,
                                 [IN_REENCRYPTION]), [old, new]))
    if after < size:
        regular.append((_segment(prev, base + after, None if dynamic else size - after,
                                 after // SECTOR), [old]))
    if after == size and dynamic and not hot:  # all new: it runs to the end again
        regular[-1][0]["size"] = "dynamic"
    backups = [(prev, [old]), (final, [new])]
    md["segments"] = {str(i): seg for i, (seg, _) in enumerate(regular + backups)}
    for entry in md["digests"].values():
        entry["segments"] = []
    for i, (_, digests) in enumerate(regular + backups):
        for d in digests:
            md["digests"][d]["segments"].append(str(i))
    return md


def _hashes(raw: bytes | bytearray | memoryview, hash_name: str, block: int
            ) -> Iterator[bytes]:
    proto = hashlib.new(hash_name)  # copied per block: far cheaper than a new()
    view = memoryview(raw)
    for i in range(0, len(view), block):
        h = proto.copy()
        h.update(view[i : i + block])
        yield h.digest()


def checksums(raw: bytes | bytearray | memoryview, hash_name: str, block: int) -> bytes:
    """The resilience area's contents: one hash per block of the original bytes."""
    return b"".join(_hashes(raw, hash_name, block))


def still_old(raw: bytes | bytearray | memoryview, stored: bytes, hash_name: str,
              block: int) -> list[int]:
    """Offsets (in the zone) of the blocks an interrupted step left as they
    were: their hash is the stored one. The others were rewritten already
    (cryptsetup's recovery does the same; a torn block matches neither)."""
    size = hashlib.new(hash_name).digest_size
    return [n * block for n, h in enumerate(_hashes(raw, hash_name, block))
            if h == stored[n * size : (n + 1) * size]]
