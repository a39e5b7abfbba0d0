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
from dataclasses import dataclass, field
from typing import Any

import structlog

from .block.base import BlockDevice
from .block.locks import RangeLock
from .hardening import lock_in_memory
from .luks import header
from .luks.device import LuksDevice
from .luks.errors import HeaderError, WrongKeyError
from .luks.luks2 import DEFAULT_ARGON2_MAX_KIB
from .luks.unlock import Unlocked, unlock_with_passphrase, unlock_with_volume_key, wipe
from .luks.volume import HEADER_PROBE, Keyslot, Volume
from .nbd.upstream import UpstreamOptions
from .secrets import ends_in_newline, read_secret
from .source import is_nbd_uri, open_source, read_prefix

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


def read_header(dev: BlockDevice, argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB
                ) -> tuple[Volume, bytes]:
    data = read_prefix(dev, HEADER_PROBE)
    vol = header.parse(data, argon2_max_kib=argon2_max_kib)
    if dev.size < vol.metadata_size:
        raise HeaderError(
            f"the header is truncated: {dev.size} bytes of {vol.metadata_size}"
        )
    return vol, data


def unlock(vol: Volume, hdr_dev: BlockDevice, prefix: bytes, keys: UnlockOptions) -> Unlocked:
    def read_area(slot: Keyslot) -> bytes:
        end = slot.area_offset + slot.area_size
        if end <= len(prefix):
            return prefix[slot.area_offset : end]
        buf = bytearray(slot.area_size)
        hdr_dev.pread_into(memoryview(buf), slot.area_offset)
        return bytes(buf)

    if keys.volume_key_file:
        secret = read_secret(keys.volume_key_file)
        try:
            return unlock_with_volume_key(vol, secret)
        finally:
            wipe(secret)
    if keys.key_file:
        secret = read_secret(keys.key_file, offset=keys.keyfile_offset, size=keys.keyfile_size)
    elif keys.passphrase_file:
        secret = read_secret(keys.passphrase_file, first_line=True)
    else:
        raise ValueError("no key source given")
    try:
        return unlock_with_passphrase(vol, secret, read_area, keys.key_slot)
    except WrongKeyError as e:
        source = keys.key_file or keys.passphrase_file
        if source and type(e) is WrongKeyError and ends_in_newline(source):
            raise NewlineKeyError(str(e), kept=bool(keys.key_file)) from None
        raise
    finally:
        wipe(secret)


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
        """In the parent, before worker processes are forked: they open their own."""
        if self._checked is not None:
            self._checked.close()
            self._checked = None

    def log_fields(self) -> dict[str, Any]:
        return {"source": self.spec}

    def wipe(self) -> None:
        """Forget secrets once no more devices will be opened."""

    def _open(self) -> BlockDevice:
        return open_source(self.spec, read_only=self.options.read_only,
                           upstream=self.options.upstream)


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
            checked = self._open_device(payload, options)
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
        }

    def wipe(self) -> None:
        wipe(self.key)

    def upstream(self, dev: BlockDevice) -> BlockDevice:
        assert isinstance(dev, LuksDevice)
        return dev.payload

    def _open(self) -> BlockDevice:
        return self._open_device(self.spec, self.options)

    def _open_device(self, payload: str, options: VolumeOptions) -> LuksDevice:
        payload_dev = open_source(payload, read_only=options.read_only,
                                  upstream=options.upstream)
        try:
            return LuksDevice(
                payload_dev, self.vol, self.key, read_only=options.read_only,
                allow_discards=options.allow_discards, attached=self.attached,
                rmw_lock=self._rmw_lock,
            )
        except BaseException:
            payload_dev.close()
            raise


def unlock_volume(payload: str, header_src: str | None, keys: UnlockOptions,
                  options: VolumeOptions) -> UnlockedVolume:
    """Read the header, unlock it, and check the payload against it."""
    if header_src is not None and _same_source(header_src, payload):
        header_src = None
    hdr_dev = open_source(header_src or payload, read_only=True, upstream=options.upstream)
    try:
        vol, prefix = read_header(hdr_dev, keys.argon2_max_kib)
        for w in vol.warnings:
            log.warning(w)
        started = time.monotonic()
        unlocked = unlock(vol, hdr_dev, prefix, keys)
        took = time.monotonic() - started
    finally:
        hdr_dev.close()
    opened = UnlockedVolume(payload, options, vol, unlocked.key, unlocked.keyslot,
                            attached=header_src is None)
    opened.unlock_seconds = took
    return opened


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
