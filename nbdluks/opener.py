"""Glue between sources and the pure LUKS code: read the header, unlock,
stack a LuksDevice over the payload."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import structlog

from .block.base import BlockDevice
from .luks import header
from .luks.device import LuksDevice
from .luks.errors import HeaderError
from .luks.luks2 import DEFAULT_ARGON2_MAX_KIB
from .luks.unlock import Unlocked, unlock_with_passphrase, unlock_with_volume_key, wipe
from .luks.volume import HEADER_PROBE, Keyslot, Volume
from .secrets import read_secret
from .source import DEFAULT_UPSTREAM, UpstreamOptions, open_source, read_prefix

log = structlog.get_logger("nbdluks.open")


@dataclass
class KeySource:
    """Where the secret comes from; never the secret itself."""

    passphrase_file: str | None = None
    key_file: str | None = None
    keyfile_offset: int = 0
    keyfile_size: int | None = None
    volume_key_file: str | None = None
    key_slot: int | None = None

    def given(self) -> bool:
        return bool(self.passphrase_file or self.key_file or self.volume_key_file)


def read_header(dev: BlockDevice, argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB
                ) -> tuple[Volume, bytes]:
    data = read_prefix(dev, HEADER_PROBE)
    vol = header.parse(data, argon2_max_kib=argon2_max_kib)
    if dev.size < vol.metadata_size:
        raise HeaderError(
            f"the header is truncated: {dev.size} bytes of {vol.metadata_size}"
        )
    return vol, data


def unlock(vol: Volume, hdr_dev: BlockDevice, prefix: bytes, keys: KeySource) -> Unlocked:
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
    finally:
        wipe(secret)


@dataclass
class UnlockedVolume:
    """A volume whose key is known: builds LuksDevices over its payload."""

    vol: Volume
    key: bytearray
    keyslot: int | None
    payload: str
    attached: bool
    read_only: bool = False
    allow_discards: bool = False
    upstream: UpstreamOptions = DEFAULT_UPSTREAM

    def device(self, rmw_lock: Any = None) -> LuksDevice:
        payload_dev = open_source(self.payload, read_only=self.read_only,
                                  upstream=self.upstream)
        try:
            return LuksDevice(
                payload_dev, self.vol, self.key, read_only=self.read_only,
                allow_discards=self.allow_discards, attached=self.attached, rmw_lock=rmw_lock,
            )
        except BaseException:
            payload_dev.close()
            raise

    def wipe(self) -> None:
        wipe(self.key)


def unlock_volume(
    payload: str, header_src: str | None, keys: KeySource, *, read_only: bool = False,
    allow_discards: bool = False, argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB,
    upstream: UpstreamOptions = DEFAULT_UPSTREAM,
) -> UnlockedVolume:
    if header_src is not None and _same_source(header_src, payload):
        header_src = None
    hdr_dev = open_source(header_src or payload, read_only=True, upstream=upstream)
    try:
        vol, prefix = read_header(hdr_dev, argon2_max_kib)
        for w in vol.warnings:
            log.warning(w)
        unlocked = unlock(vol, hdr_dev, prefix, keys)
    finally:
        hdr_dev.close()
    return UnlockedVolume(vol, unlocked.key, unlocked.keyslot, payload,
                          attached=header_src is None, read_only=read_only,
                          allow_discards=allow_discards, upstream=upstream)


def open_luks(
    payload: str, header_src: str | None, keys: KeySource, *, read_only: bool = False,
    allow_discards: bool = False, argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB,
) -> tuple[LuksDevice, Volume, int | None]:
    uv = unlock_volume(payload, header_src, keys, read_only=read_only,
                       allow_discards=allow_discards, argon2_max_kib=argon2_max_kib)
    try:
        return uv.device(), uv.vol, uv.keyslot
    finally:
        uv.wipe()


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
