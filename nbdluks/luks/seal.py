"""Sealing a volume key into key material, the inverse of unlock.open_slot:
the KDF derives the slot's key from the passphrase, the anti-forensic
splitter spreads the volume key over its stripes, and the slot's cipher
encrypts them as sectors counted from the start of the area. Also the
volume-key digest a new header carries. Pure computation: no I/O; salts
and keys come from the OS's CSPRNG."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from . import af
from .cipher import CipherSpec, SectorCipher
from .kdf import derive
from .unlock import wipe
from .volume import SECTOR, Kdf

SALT_SIZE = 32  # LUKS_SALTSIZE: slot salts and the digest's salt
STRIPES = 4000


def new_volume_key(size: int) -> bytearray:
    return bytearray(secrets.token_bytes(size))


def material_sectors(key_size: int, stripes: int = STRIPES) -> int:
    """AF_split_sectors: the sectors the split key fills."""
    return -(-key_size * stripes // SECTOR)


@dataclass(frozen=True)
class SlotSpec:
    """How a new key slot protects the key: its KDF (salt included), the
    area's cipher and key size, and the splitter's hash."""

    kdf: Kdf
    cipher: str
    area_key_size: int
    af_hash: str
    stripes: int = STRIPES


def seal(volume_key: bytes | bytearray, passphrase: bytes | bytearray,
         spec: SlotSpec) -> bytearray:
    """The encrypted key material, a whole number of sectors."""
    cipher = CipherSpec.parse(spec.cipher)
    cipher.check_key_size(spec.area_key_size)
    material = af.split(volume_key, spec.stripes, spec.af_hash)
    try:
        material += bytes(material_sectors(len(volume_key), spec.stripes) * SECTOR
                          - len(material))
        dk = derive(spec.kdf, passphrase, spec.area_key_size)
        try:
            SectorCipher(cipher, dk, SECTOR).encrypt(material, 0)
        finally:
            wipe(dk)
        return material
    except BaseException:
        wipe(material)
        raise


def key_digest(volume_key: bytes | bytearray, hash_name: str, iterations: int, salt: bytes,
               length: int) -> bytes:
    """The PBKDF2 digest by which a volume key is recognised."""
    return hashlib.pbkdf2_hmac(hash_name, bytes(volume_key), salt, iterations, length)
