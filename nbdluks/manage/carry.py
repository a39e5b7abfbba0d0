"""The key slots a rotation carries to the new volume key, as cryptsetup's
reencrypt does: each old slot is opened by its own secret (the key given,
or the passphrase its clevis token recovers from Tang), and its new slot
gets that passphrase, the old slot's costs and its tokens. A volume bound
to Tang only rotates with no secret on the host."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ..luks import Argon2, Keyslot, LuksError, Pbkdf2, SlotSpec, Volume, open_slot, rotation, wipe
from ..unlock import UnlockOptions, recover_passphrase, token_candidates
from .store import ManageError
from .target import require

log = structlog.get_logger("nbdluks.manage")


@dataclass
class Carry:
    """Old key slot -> the passphrase that opens it (the given secret is
    not ours to wipe; those recovered through tokens are)."""

    passphrases: dict[int, bytearray] = field(default_factory=dict)
    recovered: list[bytearray] = field(default_factory=list)

    def wipe(self) -> None:
        for secret in self.recovered:
            wipe(secret)


def gather(vol: Volume, read_area: Callable[[Keyslot], bytes], secret: bytearray | None,
           keys: UnlockOptions) -> Carry:
    """The slots of the data key to carry (`keys.key_slot` alone, or all),
    each with the first secret that opens it: the given one, then the
    clevis tokens naming it."""
    bound = sorted(map(int, vol.json["digests"][rotation.data_digest(vol.json)]["keyslots"]))
    wanted = [keys.key_slot] if keys.key_slot is not None else bound
    carry = Carry()
    try:
        if secret is not None:
            _opened(vol, read_area, secret, wanted, carry)
        for token in token_candidates(vol, keys.tokens):
            slots = [s for s in token.keyslots if s in wanted and s not in carry.passphrases]
            if not slots:
                continue
            try:
                recovered = recover_passphrase(token, keys.tokens)
            except LuksError as e:
                log.warning("token did not recover its passphrase", token=token.id,
                            error=str(e))
                continue
            carry.recovered.append(recovered)
            _opened(vol, read_area, recovered, slots, carry)
    except BaseException:
        carry.wipe()
        raise
    if not carry.passphrases:
        carry.wipe()
        raise ManageError("no key slot matches the key given, and no token opens one")
    return carry


def _opened(vol: Volume, read_area: Callable[[Keyslot], bytes], secret: bytearray,
            slots: list[int], carry: Carry) -> None:
    for sid in slots:
        slot = vol.keyslot(sid)
        key = None if slot is None else open_slot(vol, slot, secret, read_area(slot))
        if key is not None:
            carry.passphrases[sid] = secret
            wipe(key)


def same_kdf(vol: Volume, slot_id: int) -> SlotSpec:
    """The new slot costs what the old one did (cryptsetup: no benchmark)."""
    slot = vol.keyslot(slot_id)
    require(slot is not None, f"key slot {slot_id} cannot be used here")
    assert slot is not None
    salt = os.urandom(32)
    kdf = slot.kdf
    new_kdf = Pbkdf2(kdf.hash, kdf.iterations, salt) if isinstance(kdf, Pbkdf2) else \
        Argon2(kdf.type, kdf.time, kdf.memory, kdf.cpus, salt)
    return SlotSpec(new_kdf, slot.area_cipher, slot.area_key_size, slot.af_hash, slot.stripes)
