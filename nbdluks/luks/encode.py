"""Headers back to bytes, the inverse of luks1.parse and luks2.parse, and
the order in which cryptsetup puts them on disk.

A write is a list of steps: Write (bytes at an offset) and Sync (what was
written is durable before anything after it: fsync, or an NBD FLUSH). The
LUKS2 order is cryptsetup's (luks2_disk_metadata.c, hdr_write_disk): per
copy, primary first, the binary header with a zero checksum, then the JSON
area, then the binary header with its checksum, then a sync; a crash at any
point leaves at least one copy whole, and the one with the higher seqid wins.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from . import luks1
from .luks1 import PHDR, SLOT, SLOTS_AT
from .luks2 import BIN, CSUM_OFFSET, CSUM_SIZE, MAGIC_PRIMARY, MAGIC_SECONDARY
from .luks2_json import BIN_SIZE

_SALT_AT = 104  # the binary header's salt: after magic .. checksum_alg
LABEL_SIZE = 48
UUID_SIZE = 40


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes | bytearray


@dataclass(frozen=True)
class Sync:
    pass


Step = Write | Sync


@dataclass(frozen=True)
class Luks2Binary:
    """What the binary headers hold beside the JSON: kept across writes
    (cryptsetup keeps the salts too), the seqid set per write."""

    hdr_size: int
    uuid: str
    label: str = ""
    subsystem: str = ""
    checksum_alg: str = "sha256"
    salts: tuple[bytes, bytes] = field(
        default_factory=lambda: (secrets.token_bytes(64), secrets.token_bytes(64)))

    @classmethod
    def from_disk(cls, raw: bytes, hdr_size: int, uuid: str, label: str, subsystem: str,
                  checksum_alg: str) -> Luks2Binary:
        """The fields of a parsed header; the salts from its raw copies (new
        random ones where a copy is not there to give one)."""
        salts = tuple(
            bytes(raw[off + _SALT_AT : off + _SALT_AT + 64])
            if len(raw) >= off + _SALT_AT + 64 else secrets.token_bytes(64)
            for off in (0, hdr_size))
        return cls(hdr_size, uuid, label, subsystem, checksum_alg, (salts[0], salts[1]))


def _field(text: str, size: int) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise ValueError(f"{text!r} is longer than {size - 1} bytes")
    return raw


def json_text(md: dict[str, Any]) -> bytes:
    """Compact, as cryptsetup writes it (json-c's plain form)."""
    return json.dumps(md, separators=(",", ":"), ensure_ascii=False).encode()


def luks2_writes(binary: Luks2Binary, seqid: int, md: dict[str, Any]) -> list[Step]:
    """Both copies of a LUKS2 header: the primary, then the secondary."""
    area_size = binary.hdr_size - BIN_SIZE
    text = json_text(md)
    if len(text) > area_size - 1:
        raise ValueError(f"the JSON metadata ({len(text)} bytes) does not fit its "
                         f"{area_size}-byte area")
    area = text + bytes(area_size - len(text))
    steps: list[Step] = []
    for i, (offset, magic) in enumerate(((0, MAGIC_PRIMARY),
                                         (binary.hdr_size, MAGIC_SECONDARY))):
        head = bytearray(BIN_SIZE)
        BIN.pack_into(head, 0, magic, 2, binary.hdr_size, seqid,
                       _field(binary.label, LABEL_SIZE), _field(binary.checksum_alg, 32),
                       binary.salts[i], _field(binary.uuid, UUID_SIZE),
                       _field(binary.subsystem, LABEL_SIZE), offset)
        h = hashlib.new(binary.checksum_alg)
        h.update(head)
        h.update(area)
        summed = bytearray(head)
        summed[CSUM_OFFSET : CSUM_OFFSET + h.digest_size] = h.digest()
        assert h.digest_size <= CSUM_SIZE
        # Each copy in one write, then synced before the next: a write cut
        # short by a crash leaves that copy's checksum wrong and the other
        # copy whole (as cryptsetup's head, area, checksummed head), and two
        # changes racing on a store without a lock (an NBD export) cannot
        # mix one's binary header with the other's JSON in both copies,
        # which left neither readable (seen once under load in CI).
        steps += [Write(offset, bytes(summed) + area), Sync()]
    return steps


# --- LUKS1: the 592-byte phdr -----------------------------------------------------



@dataclass(frozen=True)
class Luks1Slot:
    state: int  # SLOT_ACTIVE, SLOT_INACTIVE, or a corrupt value
    iterations: int
    salt: bytes
    offset: int  # sectors
    stripes: int

    @property
    def active(self) -> bool:
        return self.state == luks1.SLOT_ACTIVE

    @property
    def free(self) -> bool:
        """Only a slot marked inactive is free (cryptsetup skips corrupt ones)."""
        return self.state == luks1.SLOT_INACTIVE


def luks1_phdr(cipher_name: str, cipher_mode: str, hash_spec: str, payload_offset: int,
               key_bytes: int, mk_digest: bytes, mk_salt: bytes, mk_iterations: int,
               uuid: str, slots: list[Luks1Slot]) -> bytes:
    out = bytearray(luks1.PHDR_SIZE)
    PHDR.pack_into(out, 0, luks1.MAGIC, 1, _field(cipher_name, 32), _field(cipher_mode, 32),
                    _field(hash_spec, 32), payload_offset, key_bytes, mk_digest, mk_salt,
                    mk_iterations, _field(uuid, UUID_SIZE))
    for i, slot in enumerate(slots):
        _set(out, i, slot)
    return bytes(out)


def _set(phdr: bytearray, i: int, slot: Luks1Slot) -> None:
    SLOT.pack_into(phdr, SLOTS_AT + 48 * i, slot.state, slot.iterations, slot.salt,
                    slot.offset, slot.stripes)


def luks1_slot(phdr: bytes, i: int) -> Luks1Slot:
    state, iterations, salt, offset, stripes = SLOT.unpack_from(phdr, SLOTS_AT + 48 * i)
    return Luks1Slot(state, iterations, salt, offset, stripes)


def luks1_with_slot(phdr: bytes, i: int, slot: Luks1Slot) -> bytes:
    out = bytearray(phdr[: luks1.PHDR_SIZE])
    _set(out, i, slot)
    return bytes(out)
