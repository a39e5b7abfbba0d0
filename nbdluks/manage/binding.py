"""`bind` and `unbind`: LUKS2 clevis tokens exactly as `clevis luks bind`
writes them (a new key slot holding a random passphrase, a token of type
"clevis" naming that slot and holding the passphrase's JWE in its JSON
form), so that clevis luks list/pass/unbind and nbdluks' own token unlock
work on them. Unlike clevis, which adds the slot and imports the token in
two header writes, the slot and its token land in one: a crash never
leaves a slot whose passphrase nobody can recover."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from ..luks import Luks2Header, plan_add_key, plan_remove_binding, wipe
from ..unlock import UnlockOptions, clevis_encrypt
from .kdf import KdfOptions, slot_spec
from .target import Target, active_slots, current, opened, require, volume_key, write

PINS = ("tang", "sss")


@dataclass(frozen=True)
class Bound:
    slot: int
    token: int


def _jwe_json(compact: str) -> dict[str, Any]:
    """The compact JWE in the JSON form clevis stores (`jose jwe fmt`)."""
    protected, encrypted_key, iv, ciphertext, tag = compact.split(".")
    return {"ciphertext": ciphertext, "encrypted_key": encrypted_key, "iv": iv,
            "protected": protected, "tag": tag}


def _passphrase(key_size: int) -> bytearray:
    """As many random bits as the volume key has (clevis: pwmake of its bits), printable."""
    return bytearray(secrets.token_urlsafe(key_size).encode())


def bind(target: Target, keys: UnlockOptions, pin: str, config: str, kdf: KdfOptions, *,
         trust: bool = False, timeout: float = 10.0, slot: int | None = None) -> Bound:
    with opened(target) as store:
        vol, header = current(store)
        require(isinstance(header, Luks2Header), "clevis binds LUKS1 volumes through "
                "luksmeta, which is not supported here: LUKS2 volumes only")
        assert isinstance(header, Luks2Header)
        require(pin in PINS, f"pin {pin!r} is not one of {', '.join(PINS)}")
        kdf.check(2)
        header.free_slot(slot)
        unlocked = volume_key(store, keys)
        secret = _passphrase(len(unlocked.key))
        try:
            jwe = clevis_encrypt(pin, config, secret, timeout=timeout, trust=trust)
            spec = slot_spec(kdf, 2, vol.segment.cipher, len(unlocked.key))
            plan = plan_add_key(header, unlocked.key, secret, spec, slot,
                                token={"type": "clevis", "jwe": _jwe_json(jwe)})
        finally:
            wipe(secret)
            unlocked.wipe()
        write(store, target, plan, "clevis binding added")
        assert plan.slot is not None and plan.token is not None
        return Bound(plan.slot, plan.token)


def unbind(target: Target, token: int, *, force: bool = False) -> list[int]:
    """The clevis token and its key slots, wiped; the slots' numbers."""
    with opened(target) as store:
        vol, header = current(store)
        require(isinstance(header, Luks2Header), "LUKS1 volumes have no tokens")
        assert isinstance(header, Luks2Header)
        entry = header.md["tokens"].get(str(token))
        require(entry is not None, f"token {token} does not exist")
        require(entry["type"] == "clevis", f"token {token} is of type {entry['type']!r}, "
                "not a clevis binding")
        slots = [int(k) for k in entry["keyslots"]]
        left = [s for s in active_slots(vol) if s not in slots]
        require(bool(left) or force, f"token {token}'s key slots are the last ones: without "
                "them the volume can never be opened again (forcing it is possible)")
        write(store, target, plan_remove_binding(header, token), "clevis binding removed")
        return slots
