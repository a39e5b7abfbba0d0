"""`format`: a new LUKS volume on any source, as cryptsetup's luksFormat
makes it (layout, defaults, wipe), with the volume key from the OS's CSPRNG."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..luks import (
    DEFAULT_ARGON2_MAX_KIB,
    LUKS2_HDR_SIZES,
    FormatSpec,
    Volume,
    new_header,
    new_volume_key,
    plan_add_key,
    wipe,
)
from ..nbd import UpstreamOptions
from ..unlock import open_source, read_secret
from .kdf import KdfOptions, digest_iterations, slot_spec
from .keys import NewKey
from .store import HeaderStore, ManageError, reread

_MAGICS = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")


@dataclass(frozen=True)
class Formatted:
    uuid: str
    slot: int
    data_offset: int
    version: int


def _existing(store: HeaderStore) -> bytes:
    """Where a LUKS header's copies would start (the first 4 KiB, the 512
    bytes where each possible secondary copy begins), to tell whether one is
    there and whether that changed."""
    out = bytearray()
    for offset, length in ((0, 4096), *((o, 512) for o in LUKS2_HDR_SIZES)):
        if offset < store.dev.size:
            buf = bytearray(min(length, store.dev.size - offset))
            store.dev.pread_into(memoryview(buf), offset)
            out += buf
    return bytes(out)


def _holds_luks(existing: bytes) -> bool:
    starts = [0, *range(4096, len(existing), 512)]
    return any(existing[i : i + 6] in _MAGICS for i in starts)


def _payload(payload: str, upstream: UpstreamOptions) -> tuple[int, int]:
    """A detached payload's size and the sector size that suits it."""
    with open_source(payload, read_only=True, upstream=upstream) as dev:
        return dev.size, dev.sector_hint()


def _sector_size(spec: FormatSpec, hint: int) -> FormatSpec:
    """The sector size not given: 512 for LUKS1; for LUKS2 what suits the
    payload (cryptsetup picks the same), unless the data offset is not aligned to it."""
    if spec.sector_size is not None:
        return spec
    size = 512 if spec.version == 1 or (spec.offset or 0) % hint else hint
    return replace(spec, sector_size=size)


def format_volume(header: str, payload: str | None, spec: FormatSpec, kdf: KdfOptions,
                  new: NewKey, *, upstream: UpstreamOptions, volume_key_file: str | None = None,
                  slot: int | None = None, force: bool = False) -> Formatted:
    """Format the volume whose header lives on `header` (its payload on
    `payload` when detached; None: the header is at the payload's start).
    A header file this creates is removed again if the format fails."""
    spec.check()
    kdf.check(spec.version)
    detached = payload is not None and payload != header
    payload_size, hint = _payload(payload, upstream) if detached and payload else (None, 0)
    with HeaderStore.open(header, upstream, create=detached) as store:
        try:
            spec = _sector_size(spec, hint or store.dev.sector_hint())
            return _format(store, spec, kdf, new, detached, payload_size, volume_key_file,
                           slot, force)
        except BaseException:
            if store.created:
                os.unlink(header)
            raise


def _format(store: HeaderStore, spec: FormatSpec, kdf: KdfOptions, new: NewKey,
            detached: bool, payload_size: int | None, volume_key_file: str | None,
            slot: int | None, force: bool) -> Formatted:
    before = _existing(store)
    if _holds_luks(before) and not force:
        raise ManageError(f"{store.source} already holds a LUKS header: formatting would "
                          "destroy that volume (forcing it is possible)")
    key = _volume_key(spec.key_size, volume_key_file)
    try:
        secret = new.read()
        try:
            spec = replace(spec, digest_iterations=digest_iterations(kdf, spec.key_size))
            made = new_header(spec, key, detached=detached,
                              room=None if store.grows() else store.dev.size)
            _check_sizes(made.data_offset, made.header_size, spec.sector_size or 512,
                         payload_size if detached else store.dev.size, detached)
            plan = plan_add_key(made.header, key, secret,
                                slot_spec(kdf, spec.version, spec.cipher, spec.key_size), slot)
        finally:
            wipe(secret)
    finally:
        wipe(key)
    if _existing(store) != before:
        raise ManageError(f"{store.source} changed while it was being formatted: nothing "
                          "was written")
    store.grow(made.header_size)
    store.apply([*made.wipe, *plan.steps], check=False)
    store.verify(plan.steps)
    vol: Volume = reread(store, DEFAULT_ARGON2_MAX_KIB)
    assert plan.slot is not None
    return Formatted(vol.uuid, plan.slot, made.data_offset, vol.version)


def _volume_key(size: int, path: str | None) -> bytearray:
    if path is None:
        return new_volume_key(size)
    key = read_secret(path)
    if len(key) != size:
        n = len(key)
        wipe(key)
        raise ManageError(f"the volume key file holds {n} bytes; the key size is {size}")
    return key


def _check_sizes(data_offset: int, header_size: int, sector: int, payload_size: int | None,
                 detached: bool) -> None:
    if payload_size is None:
        return
    need = data_offset + sector
    if not detached:
        need = max(need, header_size + sector)
    if payload_size < need:
        raise ManageError(f"the payload holds {payload_size} bytes: too small for data "
                          f"starting at {data_offset} (at least {need} bytes needed)")
