"""A header as it is edited: key slots and tokens added and removed in
memory, then written back as steps (encode.Write, encode.Sync) in an order
that keeps the volume openable whatever moment a crash picks.

The rules are cryptsetup's: new key material is written and synced before
the header that points to it; a removed slot's material is wiped and synced
before the header that drops it (cryptsetup's LUKS2_keyslot_wipe and
LUKS_del_key); every LUKS2 write increments the seqid and writes both
copies. Pure: the caller reads the header and performs the steps.
"""

from __future__ import annotations

import copy
import secrets
from base64 import b64encode
from dataclasses import dataclass, field
from typing import Any

from . import luks1, luks2_json
from .encode import (
    Luks1Slot,
    Luks2Binary,
    Step,
    Sync,
    Write,
    luks1_slot,
    luks1_with_slot,
    luks2_writes,
)
from .errors import HeaderError, LuksError
from .seal import SlotSpec, material_sectors, seal
from .volume import SECTOR, Argon2, Kdf, Pbkdf2, Volume

LUKS2_MAX_SLOTS = 32  # LUKS2_KEYSLOTS_MAX
LUKS2_MAX_TOKENS = 32  # LUKS2_TOKENS_MAX
AREA_ALIGN = 4096


class EditError(LuksError):
    """A change the header cannot take (no free slot, no room, a wrong id)."""


@dataclass
class Plan:
    """What a change writes, in order, and what it made."""

    steps: list[Step] = field(default_factory=list)
    slot: int | None = None
    token: int | None = None


def b64(raw: bytes) -> str:
    return b64encode(raw).decode()


def kdf_json(kdf: Kdf) -> dict[str, Any]:
    if isinstance(kdf, Pbkdf2):
        return {"type": "pbkdf2", "hash": kdf.hash, "iterations": kdf.iterations,
                "salt": b64(kdf.salt)}
    assert isinstance(kdf, Argon2)
    return {"type": kdf.type, "time": kdf.time, "memory": kdf.memory, "cpus": kdf.cpus,
            "salt": b64(kdf.salt)}


def area_size(key_size: int, stripes: int) -> int:
    """A LUKS2 key slot area: the material rounded up to 4 KiB."""
    size = material_sectors(key_size, stripes) * SECTOR
    return -(-size // AREA_ALIGN) * AREA_ALIGN


class Luks2Header:
    def __init__(self, md: dict[str, Any], binary: Luks2Binary, seqid: int) -> None:
        self.md = md
        self.binary = binary
        self.seqid = seqid

    @classmethod
    def from_volume(cls, vol: Volume, raw: bytes) -> Luks2Header:
        hdr_size = luks2_json.u64(vol.json["config"]["json_size"]) + luks2_json.BIN_SIZE
        binary = Luks2Binary.from_disk(raw, hdr_size, vol.uuid, vol.label, vol.subsystem,
                                       vol.checksum_alg)
        return cls(copy.deepcopy(vol.json), binary, vol.seqid)

    @property
    def slots(self) -> dict[str, Any]:
        return self.md["keyslots"]  # type: ignore[no-any-return]

    def free_slot(self, want: int | None = None) -> int:
        if want is not None:
            if not 0 <= want < LUKS2_MAX_SLOTS:
                raise EditError(f"key slot {want} is out of range (0-{LUKS2_MAX_SLOTS - 1})")
            if str(want) in self.slots:
                raise EditError(f"key slot {want} is in use")
            return want
        for i in range(LUKS2_MAX_SLOTS):
            if str(i) not in self.slots:
                return i
        raise EditError(f"all {LUKS2_MAX_SLOTS} key slots are in use")

    def _gaps(self) -> list[tuple[int, int]]:
        """The free parts of the keyslots area, (offset, size), in order."""
        start = 2 * self.binary.hdr_size
        end = start + luks2_json.u64(self.md["config"]["keyslots_size"])
        used = sorted((luks2_json.u64(k["area"]["offset"]), luks2_json.u64(k["area"]["size"]))
                      for k in self.slots.values())
        gaps, at = [], start
        for off, length in [*used, (end, 0)]:
            if off > at:
                gaps.append((at, off - at))
            at = max(at, off + length)
        return gaps

    def _area(self, size: int) -> int:
        """The lowest gap of `size` bytes in the keyslots area (LUKS2_find_area_gap)."""
        at = next((off for off, length in self._gaps() if length >= size), None)
        if at is None:
            raise EditError("the keyslots area has no room for another key slot")
        return at

    def largest_gap(self) -> tuple[int, int]:
        """The largest free part of the keyslots area (LUKS2_find_area_max_gap)."""
        return max(self._gaps(), key=lambda gap: gap[1], default=(0, 0))

    def add_slot(self, slot: int, spec: SlotSpec, key_size: int, digest: str,
                 priority: int | None = None) -> tuple[int, int]:
        """A luks2 key slot bound to `digest`; its area (offset, size)."""
        size = area_size(key_size, spec.stripes)
        offset = self._area(size)
        entry: dict[str, Any] = {
            "type": "luks2", "key_size": key_size,
            "af": {"type": "luks1", "stripes": spec.stripes, "hash": spec.af_hash},
            "area": {"type": "raw", "offset": str(offset), "size": str(size),
                     "encryption": spec.cipher, "key_size": spec.area_key_size},
            "kdf": kdf_json(spec.kdf)}
        if priority is not None and priority != 1:
            entry["priority"] = priority
        self.slots[str(slot)] = entry
        self.md["digests"][digest]["keyslots"].append(str(slot))
        return offset, size

    def area(self, slot: int) -> tuple[int, int]:
        area = self.slots[str(slot)]["area"]
        return luks2_json.u64(area["offset"]), luks2_json.u64(area["size"])

    def remove_slot(self, slot: int) -> None:
        """The slot and every reference to it (digests, tokens) go, as cryptsetup's wipe."""
        del self.slots[str(slot)]
        for section in ("digests", "tokens"):
            for entry in self.md[section].values():
                entry["keyslots"] = [k for k in entry["keyslots"] if k != str(slot)]

    def move_slot(self, src: int, dst: int) -> None:
        """Slot `src` takes the id `dst` (free): cryptsetup's swap, so a
        changed passphrase keeps its slot number."""
        self.slots[str(dst)] = self.slots.pop(str(src))
        for section in ("digests", "tokens"):
            for entry in self.md[section].values():
                entry["keyslots"] = [str(dst) if k == str(src) else k for k in entry["keyslots"]]

    def add_token(self, token: dict[str, Any], token_id: int | None = None) -> int:
        tokens = self.md["tokens"]
        if token_id is None:
            token_id = next((i for i in range(LUKS2_MAX_TOKENS) if str(i) not in tokens), None)
            if token_id is None:
                raise EditError(f"all {LUKS2_MAX_TOKENS} tokens are in use")
        elif not 0 <= token_id < LUKS2_MAX_TOKENS or str(token_id) in tokens:
            raise EditError(f"token {token_id} is in use or out of range")
        tokens[str(token_id)] = token
        return token_id

    def remove_token(self, token_id: int) -> dict[str, Any]:
        token = self.md["tokens"].pop(str(token_id), None)
        if token is None:
            raise EditError(f"token {token_id} does not exist")
        return token  # type: ignore[no-any-return]

    def writes(self) -> list[Step]:
        luks2_json.validate(self.md, self.binary.hdr_size - luks2_json.BIN_SIZE)
        self.seqid += 1
        return luks2_writes(self.binary, self.seqid, self.md)


class Luks1Header:
    def __init__(self, phdr: bytes) -> None:
        self.phdr = bytes(phdr[: luks1.PHDR_SIZE])

    @property
    def key_bytes(self) -> int:
        return int(luks1.PHDR.unpack_from(self.phdr)[6])

    def slot(self, i: int) -> Luks1Slot:
        return luks1_slot(self.phdr, i)

    def free_slot(self, want: int | None = None) -> int:
        if want is not None:
            if not 0 <= want < luks1.NUM_SLOTS:
                raise EditError(f"key slot {want} is out of range (0-{luks1.NUM_SLOTS - 1})")
            if not self.slot(want).free:
                raise EditError(f"key slot {want} is in use")
            return want
        for i in range(luks1.NUM_SLOTS):
            if self.slot(i).free:
                return i
        raise EditError(f"all {luks1.NUM_SLOTS} key slots are in use")

    def area(self, slot: int) -> tuple[int, int]:
        s = self.slot(slot)
        return s.offset * SECTOR, material_sectors(self.key_bytes, s.stripes) * SECTOR

    def set_slot(self, i: int, active: bool, iterations: int = 0, salt: bytes = bytes(32)
                 ) -> None:
        old = self.slot(i)
        state = luks1.SLOT_ACTIVE if active else luks1.SLOT_INACTIVE
        self.phdr = luks1_with_slot(self.phdr, i, Luks1Slot(state, iterations, salt,
                                                            old.offset, old.stripes))

    def writes(self) -> list[Step]:
        vol = luks1.parse(self.phdr)  # what we write must parse
        if vol.version != 1:
            raise HeaderError("not a LUKS1 header")
        return [Write(0, self.phdr), Sync()]


Header = Luks1Header | Luks2Header


def header_of(vol: Volume, raw: bytes) -> Header:
    return Luks1Header(raw) if vol.version == 1 else Luks2Header.from_volume(vol, raw)


def add_key(header: Header, volume_key: bytes | bytearray, passphrase: bytes | bytearray,
            spec: SlotSpec, slot: int | None = None, *, priority: int | None = None,
            token: dict[str, Any] | None = None, digest: str | None = None) -> Plan:
    """A new key slot holding the volume key under `passphrase` (and a token
    naming it, in the same header write: no orphan slot after a crash).
    `digest`: the LUKS2 digest that recognises the key (default: the first)."""
    sid = header.free_slot(slot)
    if isinstance(header, Luks1Header):
        assert isinstance(spec.kdf, Pbkdf2) and token is None
        offset, _ = header.area(sid)
        header.set_slot(sid, True, spec.kdf.iterations, spec.kdf.salt)
    else:
        digest = digest or next(iter(header.md["digests"]))
        offset, _ = header.add_slot(sid, spec, len(volume_key), digest, priority)
    material = seal(volume_key, passphrase, spec)
    plan = Plan([Write(offset, material), Sync()], slot=sid)
    if token is not None:
        assert isinstance(header, Luks2Header)
        plan.token = header.add_token({"type": token["type"], "keyslots": [str(sid)],
                                       **{k: v for k, v in token.items() if k != "type"}})
    plan.steps += header.writes()
    return plan


def remove_key(header: Header, slot: int, *, token: int | None = None) -> Plan:
    """The slot's material wiped (synced), then the header without it."""
    offset, size = header.area(slot)
    if isinstance(header, Luks1Header):
        header.set_slot(slot, False)
    else:
        header.remove_slot(slot)
        if token is not None:
            header.remove_token(token)
    return Plan([Write(offset, secrets.token_bytes(size)), Sync(), *header.writes()],
                slot=slot)


def remove_binding(header: Luks2Header, token: int) -> Plan:
    """A token and the key slots it names, wiped in one header write."""
    slots = [int(k) for k in header.remove_token(token)["keyslots"]]
    steps: list[Step] = []
    for slot in slots:
        offset, size = header.area(slot)
        steps.append(Write(offset, secrets.token_bytes(size)))
        header.remove_slot(slot)
    return Plan([*steps, Sync(), *header.writes()], token=token)


def replace_key(header: Luks2Header, old: int, new: int) -> Plan:
    """After a change: the old slot wiped, the new one moved to its id."""
    offset, size = header.area(old)
    priority = header.slots.pop(str(old)).get("priority")
    for digest in header.md["digests"].values():  # tokens keep naming `old`
        digest["keyslots"] = [k for k in digest["keyslots"] if k != str(old)]
    header.move_slot(new, old)
    if priority is not None:
        header.slots[str(old)]["priority"] = priority
    return Plan([Write(offset, secrets.token_bytes(size)), Sync(), *header.writes()], slot=old)
