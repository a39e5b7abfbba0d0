"""Which volume a command changes, and the steps every change shares:
open and lock its header, find the volume key with any key `serve`
accepts, and write a plan back, reading the result again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog

from ..luks import DEFAULT_ARGON2_MAX_KIB, Header, Plan, Unlocked, Volume, header_of
from ..nbd import UpstreamOptions
from ..unlock import UnlockOptions, unlock_copies
from .store import HeaderStore, ManageError, reread

log = structlog.get_logger("nbdluks.manage")


@dataclass(frozen=True)
class Target:
    header: str  # the header's source: the payload's when the header is attached
    upstream: UpstreamOptions = field(default_factory=UpstreamOptions)
    argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB


@contextmanager
def opened(target: Target) -> Iterator[HeaderStore]:
    """The header, open, locked and read."""
    store = HeaderStore.open(target.header, target.upstream)
    try:
        vol = store.read(target.argon2_max_kib)
        require(vol.reencryption is None, f"{target.header} is being reencrypted: its key "
                "slots change when the reencryption finishes (resume it with nbdluks or "
                "cryptsetup reencrypt)")
        yield store
    finally:
        store.close()


def volume_key(store: HeaderStore, keys: UnlockOptions) -> Unlocked:
    """The volume key, from any key `serve` takes (tokens too)."""
    _, unlocked = unlock_copies([store.copy()], keys)
    return unlocked


def current(store: HeaderStore) -> tuple[Volume, Header]:
    assert store.vol is not None
    return store.vol, header_of(store.vol, store.raw)


def write(store: HeaderStore, target: Target, plan: Plan, what: str) -> Volume:
    """Perform `plan`, check that it landed, and read the header back."""
    store.apply(plan.steps)
    store.verify(plan.steps)
    vol = reread(store, target.argon2_max_kib)
    log.info(what, source=target.header, keyslot=plan.slot, token=plan.token,
             version=vol.version)
    return vol


def active_slots(vol: Volume) -> list[int]:
    """Every key slot the header holds, usable here or not."""
    if vol.version == 2:
        return sorted(int(k) for k in vol.json["keyslots"])
    return sorted([s.id for s in vol.keyslots] + [u.id for u in vol.unusable])


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ManageError(message)
