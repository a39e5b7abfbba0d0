"""Unlocking: from a passphrase (or key file contents) through the key slots
to the volume key, or checking a volume key given directly.

Pure code: the caller reads each key slot's area and passes the bytes in.
Key material lives in bytearrays that can be wiped and mlocked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from . import af, reencrypt
from .calibrate import kdf_seconds
from .cipher import CipherSpec, SectorCipher
from .errors import HeaderError, LuksError, UnsupportedError, WrongKeyError
from .kdf import derive
from .volume import SECTOR, Digest, Kdf, Keyslot, Pbkdf2, Volume

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@dataclass
class Unlocked:
    key: bytearray
    keyslot: int | None  # None: the volume key was given directly
    # A volume in reencryption: digest id -> key, for each key its segments use.
    keys: dict[str, bytearray] = field(default_factory=dict)

    def wipe(self) -> None:
        wipe(self.key)
        for key in self.keys.values():
            wipe(key)


def wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def lock_in_memory(buf: bytearray) -> bool:
    """mlock the pages of `buf` (never swapped out); False when not permitted
    (mlock needs CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK)."""
    if not buf:
        return False
    address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    return bool(_libc.mlock(address, len(buf)) == 0)


def check_digest(digest: Digest, key: bytes | bytearray) -> bool:
    got = hashlib.pbkdf2_hmac(
        digest.hash, bytes(key), digest.salt, digest.iterations, len(digest.digest)
    )
    return hmac.compare_digest(got, digest.digest)


def slot_order(vol: Volume, only: int | None = None) -> list[Keyslot]:
    """Slots to try: high priority first, priority 0 ("ignore") only when named."""
    if only is not None:
        slot = vol.keyslot(only)
        if slot is None:
            bad = vol.unusable_slot(only)
            if bad is not None:
                raise bad.reason
            raise WrongKeyError(f"key slot {only} is not active")
        return [slot]
    usable = [s for s in vol.keyslots if s.priority > 0 and vol.digests_for(s.id)]
    return sorted(usable, key=lambda s: (-s.priority, s.id))


def check_cost(vol: Volume, slot: Keyslot | None, limit: float | None) -> None:
    """Refuse (UnsupportedError) a key slot, or with None the volume key's
    check, whose KDF and digest would take longer than `limit` seconds here:
    a hostile header must not pin a core for hours."""
    if limit is None:
        return
    digests = vol.digests if slot is None else vol.digests_for(slot.id)
    costs: list[tuple[Kdf, int]] = [(Pbkdf2(d.hash, d.iterations, d.salt), len(d.digest))
                                    for d in digests]
    if slot is not None:
        costs.append((slot.kdf, slot.area_key_size))
    seconds = sum(kdf_seconds(kdf, n, limit / len(costs)) for kdf, n in costs)
    if seconds > limit:
        what = "the volume key's digest" if slot is None else f"key slot {slot.id}"
        raise UnsupportedError(f"{what} would take about {seconds:,.0f} s to derive here, "
                               f"more than the {limit:,.0f} s allowed")


def open_slot(vol: Volume, slot: Keyslot, passphrase: bytes | bytearray,
              area: bytes | bytearray, kdf_limit: float | None = None) -> bytearray | None:
    """The volume key if `passphrase` opens `slot`, else None. `kdf_limit`:
    seconds its KDF may take here (check_cost)."""
    spec = CipherSpec.parse(slot.area_cipher)
    spec.check_key_size(slot.area_key_size)
    check_cost(vol, slot, kdf_limit)
    material_len = -(-slot.material_size // SECTOR) * SECTOR
    if len(area) < material_len:
        raise WrongKeyError(f"key slot {slot.id} area is truncated")
    dk = derive(slot.kdf, passphrase, slot.area_key_size)
    try:
        material = bytearray(area[:material_len])
        SectorCipher(spec, dk, SECTOR).decrypt(material, 0)
    finally:
        wipe(dk)
    try:
        key = af.merge(material, slot.key_size, slot.stripes, slot.af_hash)
    finally:
        wipe(material)
    if any(check_digest(d, key) for d in vol.digests_for(slot.id)):
        return key
    wipe(key)
    return None


class SlotsSkippedError(WrongKeyError):
    """No usable key slot opened; others were not tried (they cannot be used)."""

    def __init__(self, message: str, skipped: list[LuksError]) -> None:
        super().__init__(message)
        self.skipped = skipped


def unlock_with_passphrase(
    vol: Volume, passphrase: bytes | bytearray, read_area: Callable[[Keyslot], bytes],
    only_slot: int | None = None, kdf_limit: float | None = None,
) -> Unlocked:
    slots = slot_order(vol, only_slot)
    skipped: list[LuksError] = (
        [] if only_slot is not None else [u.reason for u in vol.unusable if u.priority > 0])
    tried = 0
    for slot in slots:
        try:
            key = open_slot(vol, slot, passphrase, read_area(slot), kdf_limit)
        except UnsupportedError as e:
            skipped.append(e)
            continue
        tried += 1
        if key is not None:
            return Unlocked(key, slot.id)
    if only_slot is not None and tried:
        raise WrongKeyError(f"key slot {only_slot} does not open with this passphrase")
    why = "; ".join(str(e) for e in skipped)
    if not tried:
        if skipped:
            raise SlotsSkippedError(f"no usable key slot ({why})", skipped)
        raise WrongKeyError("the volume has no usable key slot")
    if skipped:
        raise SlotsSkippedError(f"no key slot matches this passphrase; not tried: {why}",
                                skipped)
    raise WrongKeyError("no key slot matches this passphrase")


def reencryption_keys(vol: Volume, passphrase: bytes | bytearray,
                      read_area: Callable[[Keyslot], bytes], first: Unlocked,
                      kdf_limit: float | None = None) -> dict[str, bytearray]:
    """Both keys of a volume in reencryption, from one passphrase (cryptsetup
    gives the new key slots the old ones' passphrases), checked against the
    header's reencryption digest."""
    state = vol.reencryption
    assert state is not None and first.keyslot is not None
    keys = {d.id: bytearray(first.key) for d in vol.digests_for(first.keyslot)}
    wanted = {d for d in (state.old_digest, state.new_digest) if d is not None}
    try:
        for slot in slot_order(vol):
            missing = wanted - set(keys)
            if not missing:
                break
            ids = {d.id for d in vol.digests_for(slot.id)}
            if ids & missing:
                key = open_slot(vol, slot, passphrase, read_area(slot), kdf_limit)
                if key is not None:
                    keys.update({i: bytearray(key) for i in ids})
                    wipe(key)
        if wanted - set(keys):
            raise WrongKeyError("the volume is being reencrypted: this passphrase opens only "
                                "one of its two keys")
        old = keys.get(state.old_digest or "")
        new = keys.get(state.new_digest or "")
        if not reencrypt.verify(state, old, new):
            raise HeaderError("the reencryption's verification digest does not match its "
                              "keys and parameters: refused (a forged or damaged header)")
    except BaseException:
        for key in keys.values():
            wipe(key)
        raise
    return keys


def unlock_with_volume_key(vol: Volume, key: bytes | bytearray,
                           kdf_limit: float | None = None) -> Unlocked:
    check_cost(vol, None, kdf_limit)
    if vol.key_size and len(key) != vol.key_size:
        raise WrongKeyError(
            f"the volume key must be {vol.key_size} bytes, the file holds {len(key)}"
        )
    if not any(check_digest(d, key) for d in vol.digests):
        raise WrongKeyError("the volume key does not match the volume's digest")
    return Unlocked(bytearray(key), None)
