"""What a parsed LUKS header says, the same for LUKS1 and LUKS2.

Offsets and sizes are in bytes. Nothing here is secret: salts and digests
are public in the header (cryptsetup's luksDump prints them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cipher import CipherSpec
from .errors import LuksError, UnsupportedError

SECTOR = 512
# Cap on the bytes a header probe reads: the largest LUKS2 metadata copy is
# 4 MiB and there are two of them.
HEADER_PROBE = 8 * 1024 * 1024 + 4096


@dataclass(frozen=True, slots=True)
class Pbkdf2:
    hash: str
    iterations: int
    salt: bytes
    type: str = "pbkdf2"


@dataclass(frozen=True, slots=True)
class Argon2:
    type: str  # "argon2i" | "argon2id"
    time: int
    memory: int  # KiB
    cpus: int
    salt: bytes


Kdf = Pbkdf2 | Argon2


@dataclass(frozen=True, slots=True)
class Keyslot:
    id: int
    kdf: Kdf
    area_offset: int
    area_size: int
    area_cipher: str
    area_key_size: int  # bytes the KDF derives
    key_size: int  # bytes of the volume key this slot holds
    stripes: int
    af_hash: str
    priority: int = 1  # 0 ignore, 1 normal, 2 high

    @property
    def material_size(self) -> int:
        return self.key_size * self.stripes


@dataclass(frozen=True, slots=True)
class Digest:
    hash: str
    iterations: int
    salt: bytes
    digest: bytes
    keyslots: tuple[int, ...]
    id: str = "0"  # LUKS2: its id in the header (the key of a segment in reencryption)


@dataclass(frozen=True, slots=True)
class UnusableSlot:
    """A key slot the header holds validly but that cannot be used here;
    other slots still can."""

    id: int
    type: str  # the slot's (or its KDF's) type, for inspect
    reason: LuksError
    priority: int = 1


@dataclass(frozen=True, slots=True)
class Token:
    """A LUKS2 token: kept and shown whatever its type."""

    id: int
    type: str
    keyslots: tuple[int, ...]
    json: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Segment:
    offset: int
    size: int | None  # None: "dynamic", up to the end of the payload device
    iv_tweak: int
    cipher: str
    sector_size: int

    def cipher_spec(self) -> CipherSpec:
        return CipherSpec.parse(self.cipher)


@dataclass(frozen=True)
class Volume:
    version: int
    uuid: str
    segment: Segment
    keyslots: tuple[Keyslot, ...]
    digests: tuple[Digest, ...]
    key_size: int
    # Bytes at the start of the header device that belong to the header
    # (binary headers, JSON, key slot areas): an attached payload starts
    # after them.
    metadata_size: int
    label: str = ""
    subsystem: str = ""
    hash_spec: str = ""  # LUKS1
    copy: str = "primary"  # which LUKS2 header copy is in use
    seqid: int = 0
    checksum_alg: str = ""
    json: dict[str, Any] = field(default_factory=dict)  # LUKS2 metadata, for inspect
    warnings: tuple[str, ...] = ()
    unusable: tuple[UnusableSlot, ...] = ()
    tokens: tuple[Token, ...] = ()
    # Why the volume, valid as a header, cannot be served (None: it can).
    unservable: str | None = None
    reencryption: Any = None  # reencrypt.Reencryption: a reencryption in progress

    def check_servable(self) -> None:
        """Raise the reason a valid header still cannot be served."""
        if self.unservable is not None:
            raise UnsupportedError(f"the volume cannot be served: {self.unservable}")

    def keyslot(self, slot_id: int) -> Keyslot | None:
        return next((k for k in self.keyslots if k.id == slot_id), None)

    def identity(self) -> tuple[str, frozenset[tuple[bytes, bytes]]]:
        """What makes two headers the same volume: UUID and volume-key digests."""
        return self.uuid, frozenset((d.salt, d.digest) for d in self.digests)

    def unusable_slot(self, slot_id: int) -> UnusableSlot | None:
        return next((k for k in self.unusable if k.id == slot_id), None)

    def digests_for(self, slot_id: int) -> tuple[Digest, ...]:
        return tuple(d for d in self.digests if slot_id in d.keyslots)
