"""Key slots: add-key, change-key, remove-key, kill-slot, as cryptsetup's
luksAddKey, luksChangeKey, luksRemoveKey and luksKillSlot, on any source.

The volume key never changes, so a volume being served keeps serving. At
every moment of a change a key that opened the volume before still opens
it, or the new one does (change-key writes the new slot before it wipes
the old one)."""

from __future__ import annotations

from dataclasses import dataclass

from ..luks import Luks2Header, plan_add_key, plan_remove_key, plan_replace_key, wipe
from ..unlock import UnlockOptions, read_new_secret
from .kdf import KdfOptions, slot_spec
from .store import ManageError
from .target import Target, active_slots, current, opened, require, volume_key, write


@dataclass(frozen=True)
class NewKey:
    """Where a new secret comes from: a passphrase file, a key file, or the terminal."""

    passphrase_file: str | None = None
    key_file: str | None = None
    keyfile_offset: int = 0
    keyfile_size: int | None = None

    def read(self) -> bytearray:
        return read_new_secret(self.passphrase_file, self.key_file,
                               offset=self.keyfile_offset, size=self.keyfile_size)


def add_key(target: Target, keys: UnlockOptions, new: NewKey, kdf: KdfOptions,
            slot: int | None = None) -> int:
    """A new key slot; its number."""
    with opened(target) as store:
        vol, header = current(store)
        kdf.check(vol.version)
        header.free_slot(slot)  # refused before any KDF runs
        unlocked = volume_key(store, keys)
        secret = new.read()
        try:
            spec = slot_spec(kdf, vol.version, vol.segment.cipher, len(unlocked.key),
                             vol.hash_spec)
            plan = plan_add_key(header, unlocked.key, secret, spec, slot)
        finally:
            wipe(secret)
            unlocked.wipe()
        write(store, target, plan, "key slot added")
        assert plan.slot is not None
        return plan.slot


def change_key(target: Target, keys: UnlockOptions, new: NewKey, kdf: KdfOptions) -> int:
    """The passphrase of the slot the key opens, changed; the slot's number
    after (LUKS2 keeps it, LUKS1 moves to a free slot, as cryptsetup)."""
    with opened(target) as store:
        vol, header = current(store)
        kdf.check(vol.version)
        unlocked = volume_key(store, keys)
        old = unlocked.keyslot
        try:
            require(old is not None, "changing a key needs the passphrase or key file of "
                    "the key slot to change, not the volume key")
            assert old is not None
            # A free slot: the old one stays until the new one works. cryptsetup
            # rewrites a full volume's slot in place; a crash there loses both keys.
            temp = header.free_slot()
            secret = new.read()
            try:
                spec = slot_spec(kdf, vol.version, vol.segment.cipher, len(unlocked.key),
                                 vol.hash_spec)
                priority = None
                if isinstance(header, Luks2Header):
                    priority = header.slots[str(old)].get("priority")
                plan = plan_add_key(header, unlocked.key, secret, spec, temp, priority=priority)
            finally:
                wipe(secret)
        finally:
            unlocked.wipe()
        write(store, target, plan, "new key slot written")
        vol, header = current(store)
        if isinstance(header, Luks2Header):
            write(store, target, plan_replace_key(header, old, temp), "key slot changed")
            return old
        write(store, target, plan_remove_key(header, old), "old key slot removed")
        return temp


def remove_key(target: Target, keys: UnlockOptions, *, force: bool = False) -> int:
    """The key slot the key opens, wiped; its number."""
    with opened(target) as store:
        vol, header = current(store)
        unlocked = volume_key(store, keys)
        unlocked.wipe()
        slot = unlocked.keyslot
        require(slot is not None, "removing a key needs its passphrase or key file, not "
                "the volume key")
        assert slot is not None
        _not_last(active_slots(vol), slot, force)
        write(store, target, plan_remove_key(header, slot), "key slot removed")
        return slot


def kill_slot(target: Target, keys: UnlockOptions, slot: int, *, force: bool = False) -> None:
    """Key slot `slot` wiped. A key of another slot proves the right to do
    it; with `force`, none is asked (cryptsetup's batch mode)."""
    with opened(target) as store:
        vol, header = current(store)
        slots = active_slots(vol)
        require(slot in slots, f"key slot {slot} is not active (active: "
                f"{', '.join(map(str, slots)) or 'none'})")
        _not_last(slots, slot, force)
        if not force or keys.given():
            unlocked = volume_key(store, keys)
            unlocked.wipe()
            require(unlocked.keyslot != slot, f"the key given opens key slot {slot} itself: "
                    "give the key of a slot that stays")
        write(store, target, plan_remove_key(header, slot), "key slot killed")


def _not_last(slots: list[int], slot: int, force: bool) -> None:
    if slots == [slot] and not force:
        raise ManageError(f"key slot {slot} is the last one: without it the volume can "
                          "never be opened again (forcing it is possible)")
