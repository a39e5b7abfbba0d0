"""From a key the user gave (a passphrase, key file or volume key, read
once) or from the volume's tokens, to the volume key: tried on each header
copy in turn, as `serve` does and `inspect` checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from ..luks import (
    DEFAULT_ARGON2_MAX_KIB,
    LuksError,
    Unlocked,
    Volume,
    WrongKeyError,
    open_device,
    reencryption_keys,
    unlock_with_passphrase,
    unlock_with_volume_key,
    wipe,
)
from .headers import HeaderCopy
from .secrets import ends_in_newline, read_secret
from .tokens import TokenOptions, unlock_with_tokens

log = structlog.get_logger("nbdluks.open")

# Many times cryptsetup's default of 2 s, for a header made on a faster machine.
DEFAULT_KDF_LIMIT = 120.0


@dataclass(frozen=True)
class UnlockOptions:
    """Where the secret comes from (never the secret itself), and what
    unlocking may cost."""

    passphrase_file: str | None = None
    key_file: str | None = None
    keyfile_offset: int = 0
    keyfile_size: int | None = None
    volume_key_file: str | None = None
    key_slot: int | None = None
    argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB
    # Seconds a key slot's KDF (with its digest) may take here, estimated
    # before it runs; slower slots are refused with the estimate.
    kdf_limit: float = DEFAULT_KDF_LIMIT
    # With no key given, LUKS2 tokens unlock (as cryptsetup open does).
    tokens: TokenOptions = field(default_factory=TokenOptions)

    def given(self) -> bool:
        return bool(self.passphrase_file or self.key_file or self.volume_key_file)


class NewlineKeyError(WrongKeyError):
    """No key slot opened, and the secret's file ends in a newline: kept as
    part of the key (a key file), or dropped (a passphrase file's line)."""

    def __init__(self, message: str, *, kept: bool) -> None:
        super().__init__(message)
        self.kept = kept


def unlock(copies: Sequence[HeaderCopy], keys: UnlockOptions) -> tuple[HeaderCopy, Unlocked]:
    """Unlock through the first copy that opens with the key (the secret is
    read once), or with no key given through its tokens; the error of the
    first copy when none does."""
    if not keys.given():
        return _first_copy(copies, lambda c: unlock_with_tokens(
            _servable(c), c.read_area, keys.tokens, keys.key_slot, keys.kdf_limit))
    secret = given_secret(keys)
    try:
        return _first_copy(copies, lambda c: _unlock_copy(c, secret, keys))
    except WrongKeyError as e:
        source = keys.key_file or keys.passphrase_file
        if source and type(e) is WrongKeyError and ends_in_newline(source):
            raise NewlineKeyError(str(e), kept=bool(keys.key_file)) from None
        raise
    finally:
        wipe(secret)


def given_secret(keys: UnlockOptions) -> bytearray:
    """The secret the user gave, read once (a passphrase file's first line)."""
    if keys.volume_key_file:
        return read_secret(keys.volume_key_file)
    if keys.key_file:
        return read_secret(keys.key_file, offset=keys.keyfile_offset, size=keys.keyfile_size)
    if keys.passphrase_file:
        return read_secret(keys.passphrase_file, first_line=True)
    raise ValueError("no key source given")


@contextmanager
def secret_once(keys: UnlockOptions) -> Iterator[UnlockOptions]:
    """The passphrase or key file read once and kept in an anonymous memory
    file for the time of the block, so that it can be read again (a FIFO or
    standard input cannot): options that read it from there."""
    if not (keys.passphrase_file or keys.key_file):
        yield keys
        return
    secret = given_secret(keys)
    fd = os.memfd_create("nbdluks-key", os.MFD_CLOEXEC)
    try:
        view = memoryview(secret)
        while view:
            view = view[os.write(fd, view):]
        yield replace(keys, passphrase_file=None, key_file=f"/proc/self/fd/{fd}",
                      keyfile_offset=0, keyfile_size=None)
    finally:
        wipe(secret)
        os.ftruncate(fd, 0)
        os.close(fd)


def _first_copy(copies: Sequence[HeaderCopy], attempt: Callable[[HeaderCopy], Unlocked]
                ) -> tuple[HeaderCopy, Unlocked]:
    first: LuksError | None = None
    for copy in copies:
        try:
            return copy, attempt(copy)
        except LuksError as e:
            if len(copies) > 1:
                log.warning("header copy does not unlock", source=copy.source, error=str(e))
            first = first or e
    assert first is not None
    raise first


def _servable(copy: HeaderCopy) -> Volume:
    assert copy.vol is not None
    copy.vol.check_servable()
    return copy.vol


def _unlock_copy(copy: HeaderCopy, secret: bytearray, keys: UnlockOptions) -> Unlocked:
    vol = _servable(copy)
    if keys.volume_key_file:
        unlocked = unlock_with_volume_key(vol, secret, keys.kdf_limit)
    else:
        unlocked = unlock_with_passphrase(vol, secret, copy.read_area, keys.key_slot,
                                          keys.kdf_limit)
    if vol.reencryption is not None:
        if unlocked.keyslot is None:
            unlocked.wipe()
            raise WrongKeyError("the volume is being reencrypted: its two keys come from a "
                                "passphrase, not from one volume key")
        try:
            unlocked.keys = reencryption_keys(vol, secret, copy.read_area, unlocked,
                                              keys.kdf_limit)
        except BaseException:
            unlocked.wipe()
            raise
    return unlocked


def key_check(copies: Sequence[HeaderCopy], keys: UnlockOptions
              ) -> tuple[dict[str, Any], LuksError | None]:
    """`inspect`'s key test: unlock as `serve` would, and run the checks it
    runs before listening. What to show, and the error if it failed."""
    try:
        copy, unlocked = unlock(copies, keys)
    except LuksError as e:
        return {"ok": False, "reason": str(e)}, e
    try:
        vol, dev = copy.vol, copy.dev
        assert vol is not None and dev is not None
        if dev.size > vol.segment.offset > 0:  # a whole volume, not a detached header
            open_device(dev, vol, unlocked.key, unlocked.keys, read_only=True,
                        attached=True).close()
            copy.dev = None  # closed with the device
    except LuksError as e:
        return {"ok": False, "reason": f"the key opens, but serve would refuse: {e}"}, e
    finally:
        unlocked.wipe()
    return {"ok": True, "keyslot": unlocked.keyslot, "source": copy.source}, None
