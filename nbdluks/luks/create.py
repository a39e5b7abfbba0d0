"""A new header, laid out as cryptsetup's luksFormat lays it out
(LUKS2_hdr_get_storage_params, LUKS_generate_phdr): the areas it takes, the
wipe that comes first, and the header with no key slot yet (edit.add_key
adds the first). Pure: the caller performs the steps."""

from __future__ import annotations

import secrets
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from . import luks1
from .cipher import CipherSpec
from .edit import EditError, Header, Luks1Header, Luks2Header, b64
from .encode import Luks1Slot, Luks2Binary, Step, Sync, Write, luks1_phdr
from .luks2 import HDR_SIZES, SECTOR_SIZES
from .luks2_json import BIN_SIZE, MAX_KEYSLOTS_SIZE
from .seal import SALT_SIZE, STRIPES, key_digest, material_sectors
from .volume import SECTOR

MiB = 1 << 20
DEFAULT_HDR_AREA = 16 * MiB  # LUKS2_DEFAULT_HDR_SIZE: both copies and the keyslots area
ALIGNMENT = MiB  # DEFAULT_DISK_ALIGNMENT: where an attached payload starts
LUKS1_DIGEST_SIZE = 20
LUKS1_ALIGN_KEYSLOTS = 4096


@dataclass(frozen=True)
class FormatSpec:
    version: int = 2
    cipher: str = "aes-xts-plain64"
    key_size: int = 64  # bytes
    sector_size: int | None = None  # None: what suits the payload (LUKS1: 512)
    hash: str = "sha256"
    uuid: str = ""  # "": a random one
    label: str = ""
    subsystem: str = ""
    metadata_size: int = 16 * 1024  # one LUKS2 copy
    keyslots_size: int | None = None
    offset: int | None = None  # where the payload's data starts, bytes (None: default)
    digest_iterations: int = 1000

    def check(self) -> None:
        CipherSpec.parse(self.cipher).check_key_size(self.key_size)
        if self.version == 1:
            if self.sector_size not in (None, SECTOR):
                raise EditError("LUKS1 supports only 512-byte sectors")
            if "-" not in self.cipher:
                raise EditError(f"LUKS1 needs a cipher with a mode, not {self.cipher!r}")
        elif self.version != 2:
            raise EditError(f"LUKS version {self.version} is not one of 1, 2")
        if self.sector_size is not None and self.sector_size not in SECTOR_SIZES:
            raise EditError(f"sector size {self.sector_size} is not one of {SECTOR_SIZES}")
        if self.metadata_size not in HDR_SIZES:
            raise EditError(f"LUKS2 metadata size {self.metadata_size} is not one of "
                            f"{', '.join(map(str, HDR_SIZES))}")
        if self.keyslots_size is not None and (self.keyslots_size % 4096 or not
                                               0 < self.keyslots_size <= MAX_KEYSLOTS_SIZE):
            raise EditError(f"LUKS2 keyslots size {self.keyslots_size} is not a multiple of "
                            f"4096 up to {MAX_KEYSLOTS_SIZE}")
        self.canonical_uuid()
        for what, text in (("label", self.label), ("subsystem", self.subsystem)):
            if len(text.encode()) > 47:
                raise EditError(f"the {what} is {len(text.encode())} bytes long, at most 47 fit")
        if self.offset is not None and self.offset % (self.sector_size or SECTOR):
            raise EditError(f"the data offset {self.offset} is not a multiple of the "
                            f"{self.sector_size or SECTOR}-byte sector")

    def canonical_uuid(self) -> str:
        if not self.uuid:
            return str(uuidlib.uuid4())
        try:
            canonical = str(uuidlib.UUID(self.uuid))
        except ValueError:
            canonical = ""
        if canonical != self.uuid.lower():  # no braces, no urn: as libuuid parses it
            raise EditError(f"wrong LUKS UUID format: {self.uuid!r}")
        return canonical


@dataclass
class NewHeader:
    header: Header
    wipe: list[Step]  # before anything else is written
    data_offset: int  # bytes into the payload
    header_size: int  # bytes the header device must hold


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def luks2_layout(spec: FormatSpec, detached: bool, room: int | None) -> tuple[int, int]:
    """(data offset, keyslots size) in bytes; `room`: what a header device
    that cannot grow holds (None: it grows, a file)."""
    md2 = 2 * spec.metadata_size
    offset = spec.offset or 0
    if offset and offset < md2:
        raise EditError(f"the data offset {offset} is inside the LUKS2 metadata ({md2} bytes)")
    keyslots = spec.keyslots_size or 0
    if not keyslots and offset:
        keyslots = offset - md2
    keyslots = min(keyslots - keyslots % 4096, MAX_KEYSLOTS_SIZE)
    if not keyslots:
        keyslots = DEFAULT_HDR_AREA - md2
        if room is not None and md2 + keyslots > room and md2 < room:
            keyslots = (room - md2) - (room - md2) % 4096
    if offset and keyslots + md2 > offset:
        keyslots = offset - md2
    if not offset and not detached:
        offset = _round_up(md2 + keyslots, ALIGNMENT)
    return offset, keyslots


def new_luks2(spec: FormatSpec, volume_key: bytes | bytearray, detached: bool,
              room: int | None) -> NewHeader:
    offset, keyslots = luks2_layout(spec, detached, room)
    salt = secrets.token_bytes(SALT_SIZE)
    digest = key_digest(volume_key, spec.hash, spec.digest_iterations, salt, 32)
    md: dict[str, Any] = {
        "keyslots": {}, "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": str(offset), "size": "dynamic",
                           "iv_tweak": "0", "encryption": spec.cipher,
                           "sector_size": spec.sector_size}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": [], "segments": ["0"],
                          "hash": spec.hash, "iterations": spec.digest_iterations,
                          "salt": b64(salt), "digest": b64(digest)}},
        "config": {"json_size": str(spec.metadata_size - BIN_SIZE),
                   "keyslots_size": str(keyslots)},
    }
    binary = Luks2Binary(spec.metadata_size, spec.canonical_uuid(), spec.label,
                         spec.subsystem)
    md2 = 2 * spec.metadata_size
    wipe: list[Step] = [Write(0, bytes(md2)), Write(md2, secrets.token_bytes(keyslots)),
                        Sync()]
    return NewHeader(Luks2Header(md, binary, 0), wipe, offset, md2 + keyslots)


def new_luks1(spec: FormatSpec, volume_key: bytes | bytearray, detached: bool) -> NewHeader:
    per_slot = _round_up(material_sectors(spec.key_size), LUKS1_ALIGN_KEYSLOTS // SECTOR)
    first = LUKS1_ALIGN_KEYSLOTS // SECTOR
    slots = [Luks1Slot(luks1.SLOT_INACTIVE, 0, bytes(32), first + i * per_slot, STRIPES)
             for i in range(luks1.NUM_SLOTS)]
    end = first + luks1.NUM_SLOTS * per_slot  # sectors
    if spec.offset is not None:
        payload = spec.offset // SECTOR
        if payload and payload < end:
            raise EditError(f"the data offset {spec.offset} is inside the LUKS1 header "
                            f"({end * SECTOR} bytes)")
    else:
        payload = 0 if detached else _round_up(end, ALIGNMENT // SECTOR)
    name, mode = spec.cipher.split("-", 1)
    salt = secrets.token_bytes(SALT_SIZE)
    digest = key_digest(volume_key, spec.hash, spec.digest_iterations, salt,
                        LUKS1_DIGEST_SIZE)
    phdr = luks1_phdr(name, mode, spec.hash, payload, spec.key_size, digest, salt,
                      spec.digest_iterations, spec.canonical_uuid(), slots)
    areas = end * SECTOR - LUKS1_ALIGN_KEYSLOTS
    wipe: list[Step] = [Write(0, bytes(LUKS1_ALIGN_KEYSLOTS)),
                        Write(LUKS1_ALIGN_KEYSLOTS, secrets.token_bytes(areas))]
    if payload > end:
        wipe.append(Write(end * SECTOR, bytes((payload - end) * SECTOR)))
    wipe.append(Sync())
    return NewHeader(Luks1Header(phdr), wipe, payload * SECTOR, end * SECTOR)


def new_header(spec: FormatSpec, volume_key: bytes | bytearray, *, detached: bool,
               room: int | None) -> NewHeader:
    spec.check()
    if spec.version == 1:
        return new_luks1(spec, volume_key, detached)
    return new_luks2(spec, volume_key, detached, room)
