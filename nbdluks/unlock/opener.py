"""Glue between sources and the pure LUKS code: open what is to be served,
read the header, unlock, stack a LuksDevice over the payload.

Everything here happens before anything listens, so that a wrong key or an
unusable source ends the program with one line. The result is an `Opened`
source: it hands out a device per worker process, says whether several
processes may serve it, describes itself for the log, and wipes the key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..block.base import BlockDevice
from ..block.file import FileDevice
from ..block.locks import RangeLock
from ..daemon.hardening import lock_in_memory
from ..luks.device import LuksDevice
from ..luks.errors import LuksError, UnsupportedError, WrongKeyError
from ..luks.luks2 import DEFAULT_ARGON2_MAX_KIB
from ..luks.unlock import Unlocked, unlock_with_passphrase, unlock_with_volume_key, wipe
from ..luks.volume import Volume
from ..nbd.upstream import UpstreamOptions
from .headers import HeaderCopy, read_copies
from .secrets import ends_in_newline, read_secret
from .sources import is_nbd_uri, open_source
from .tokens import TokenOptions, unlock_with_tokens

log = structlog.get_logger("nbdluks.open")


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


@dataclass(frozen=True)
class VolumeOptions:
    """How the served device is opened."""

    read_only: bool = False
    allow_discards: bool = False
    upstream: UpstreamOptions = field(default_factory=UpstreamOptions)


def unlock(copies: Sequence[HeaderCopy], keys: UnlockOptions) -> tuple[HeaderCopy, Unlocked]:
    """Unlock through the first copy that opens with the key (the secret is
    read once), or with no key given through its tokens; the error of the
    first copy when none does."""
    if not keys.given():
        return _first_copy(copies, lambda c: unlock_with_tokens(
            _servable(c), c.read_area, keys.tokens, keys.key_slot))
    if keys.volume_key_file:
        secret = read_secret(keys.volume_key_file)
    elif keys.key_file:
        secret = read_secret(keys.key_file, offset=keys.keyfile_offset, size=keys.keyfile_size)
    elif keys.passphrase_file:
        secret = read_secret(keys.passphrase_file, first_line=True)
    else:
        raise ValueError("no key source given")
    try:
        return _first_copy(copies, lambda c: _unlock_copy(c, secret, keys))
    except WrongKeyError as e:
        source = keys.key_file or keys.passphrase_file
        if source and type(e) is WrongKeyError and ends_in_newline(source):
            raise NewlineKeyError(str(e), kept=bool(keys.key_file)) from None
        raise
    finally:
        wipe(secret)


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
    if copy.vol.unservable is not None:
        raise UnsupportedError(f"the volume cannot be served: {copy.vol.unservable}")
    return copy.vol


def _unlock_copy(copy: HeaderCopy, secret: bytearray, keys: UnlockOptions) -> Unlocked:
    vol = _servable(copy)
    if keys.volume_key_file:
        return unlock_with_volume_key(vol, secret)
    return unlock_with_passphrase(vol, secret, copy.read_area, keys.key_slot)


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
            LuksDevice(dev, vol, unlocked.key, read_only=True, attached=True).close()
            copy.dev = None  # closed with the LuksDevice
    except LuksError as e:
        return {"ok": False, "reason": f"the key opens, but serve would refuse: {e}"}, e
    finally:
        unlocked.wipe()
    return {"ok": True, "keyslot": unlocked.keyslot, "source": copy.source}, None


class Opened:
    """A source opened and checked before anything listens.

    `device()` first hands out the device that was opened for the check,
    then opens new ones (one per worker process)."""

    # Whether worker processes, each with its own open, may serve it.
    multi_process: bool
    # Seconds the unlock took (None: nothing was unlocked).
    unlock_seconds: float | None = None
    role = "raw"  # what the source is, in metrics

    def __init__(self, spec: str, options: VolumeOptions, checked: BlockDevice) -> None:
        self.spec = spec
        self.options = options
        self._checked: BlockDevice | None = checked
        self._file: FileDevice | None = None  # kept open for the workers
        self.multi_process = checked.multi_open

    def device(self) -> BlockDevice:
        dev, self._checked = self._checked, None
        return dev if dev is not None else self._open()

    @property
    def watched_upstream(self) -> str | None:
        """The role of the source when it is an NBD export (its connection is watched)."""
        return self.role if is_nbd_uri(self.spec) else None

    def upstream(self, dev: BlockDevice) -> BlockDevice:
        """The device that `device()` returned reads and writes through."""
        return dev

    def prepare_processes(self) -> None:
        """In the parent, before worker processes are forked: they open their
        own devices; a file stays open here for them to share (they may run
        with fewer rights than it took to open it), an NBD connection does not
        (its threads would not survive the fork)."""
        if self._checked is not None:
            base = self.upstream(self._checked)
            if isinstance(base, FileDevice):
                self._file = base.reopen()
            self._checked.close()
            self._checked = None

    def _source(self) -> BlockDevice:
        """The source opened again, for one more process."""
        if self._file is not None:
            return self._file.reopen()
        return open_source(self.spec, read_only=self.options.read_only,
                           upstream=self.options.upstream)

    def log_fields(self) -> dict[str, Any]:
        return {"source": self.spec}

    def wipe(self) -> None:
        """Forget secrets once no more devices will be opened."""

    def _open(self) -> BlockDevice:
        return self._source()


def open_raw(spec: str, options: VolumeOptions) -> Opened:
    """A file, block device or NBD export served as it is."""
    dev = open_source(spec, read_only=options.read_only, upstream=options.upstream)
    return Opened(spec, options, dev)


class UnlockedVolume(Opened):
    """A volume whose key is known: builds LuksDevices over its payload."""

    role = "payload"

    def __init__(self, payload: str, options: VolumeOptions, vol: Volume, key: bytearray,
                 keyslot: int | None, attached: bool) -> None:
        self.vol = vol
        self.key = key
        self.keyslot = keyslot
        self.attached = attached
        # Partial-sector writes to the same sectors take turns, across worker
        # processes too (the lock's memfd is inherited over fork).
        self._rmw_lock = RangeLock()
        try:
            checked = self._open_device(
                open_source(payload, read_only=options.read_only, upstream=options.upstream),
                options)
        except BaseException:
            wipe(key)
            self._rmw_lock.close()
            raise
        super().__init__(payload, options, checked)
        self.engine = checked.cipher.engine
        self.size = checked.size
        self.key_locked = lock_in_memory(key)

    def log_fields(self) -> dict[str, Any]:
        vol = self.vol
        return {
            "luks_version": vol.version, "uuid": vol.uuid, "cipher": vol.segment.cipher,
            "sector_size": vol.segment.sector_size, "keyslot": self.keyslot, "size": self.size,
            "header_copy": vol.copy, "cipher_engine": self.engine,
            "key_locked_in_memory": self.key_locked,
            "unlock_seconds": None if self.unlock_seconds is None
            else round(self.unlock_seconds, 3),
        }

    def wipe(self) -> None:
        wipe(self.key)

    def upstream(self, dev: BlockDevice) -> BlockDevice:
        assert isinstance(dev, LuksDevice)
        return dev.payload

    def _open(self) -> BlockDevice:
        return self._open_device(self._source(), self.options)

    def _open_device(self, payload_dev: BlockDevice, options: VolumeOptions) -> LuksDevice:
        try:
            return LuksDevice(
                payload_dev, self.vol, self.key, read_only=options.read_only,
                allow_discards=options.allow_discards, attached=self.attached,
                rmw_lock=self._rmw_lock,
            )
        except BaseException:
            payload_dev.close()
            raise


def unlock_volume(payload: str, headers: Sequence[str], keys: UnlockOptions,
                  options: VolumeOptions) -> UnlockedVolume:
    """Read the header copies (none given: the payload's own), unlock
    through the first that opens, and check the payload against it."""
    copies = read_copies(list(headers) or [payload], keys.argon2_max_kib, options.upstream)
    try:
        for copy in copies:
            assert copy.vol is not None
            for w in copy.vol.warnings:
                log.warning(w, source=copy.source)
        started = time.monotonic()
        copy, unlocked = unlock(copies, keys)
        took = time.monotonic() - started
    finally:
        for c in copies:
            c.close()
    assert copy.vol is not None
    if len(copies) > 1 or len(headers) > 1:
        log.info("header copy in use", source=copy.source)
    opened = UnlockedVolume(payload, options, copy.vol, unlocked.key, unlocked.keyslot,
                            attached=_same_source(copy.source, payload))
    opened.unlock_seconds = took
    return opened


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
