"""A volume in reencryption as one device: each regular segment read and
written through its own key (a LuksDevice per crypt segment, a window of
the payload per linear one), requests split where segments meet. The
segments are where cryptsetup's clean state says they are; nothing here
moves them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..block import BlockDevice, Buffer, Capabilities, RangeLock
from .device import LuksDevice
from .errors import HeaderError
from .multikey import MultiKeyDevice
from .reencrypt import logical_size
from .rotating import RotatingDevice
from .volume import Volume


class _Window(BlockDevice):
    """Plaintext at `offset` on the payload (a linear segment)."""

    def __init__(self, payload: BlockDevice, offset: int, size: int, writable: bool) -> None:
        self.payload, self.offset, self.size = payload, offset, size
        pc = payload.caps
        self.caps = Capabilities(writable=writable and pc.writable, flush=pc.flush,
                                 fua=writable and pc.fua, trim=False, zero=writable,
                                 fast_zero=False, extents=False, cache=pc.cache,
                                 multi_conn=pc.multi_conn)

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        self.payload.pread_into(buf, self.offset + offset)

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        self.payload.pwrite(buf, self.offset + offset, fua)

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        self.payload.write_zeroes(self.offset + offset, length, fua=fua)

    def _cache(self, offset: int, length: int) -> None:
        self.payload.cache(self.offset + offset, length)

    def _flush(self) -> None:
        self.payload.flush()


class SegmentedDevice(MultiKeyDevice):
    def __init__(self, payload: BlockDevice, vol: Volume, keys: dict[str, bytearray], *,
                 read_only: bool = False, allow_discards: bool = False,
                 attached: bool = False, rmw_lock: RangeLock | None = None) -> None:
        state = vol.reencryption
        assert state is not None
        self._keep(payload, vol, keys, read_only=read_only, allow_discards=allow_discards,
                   attached=attached, rmw_lock=rmw_lock)
        assert self._keys is not None
        sectors = max(p.segment.sector_size for p in state.pieces if p.digest) if any(
            p.digest for p in state.pieces) else 512
        total = logical_size(state, payload.size)
        self.size = total - total % sectors
        if self.size <= 0:
            raise HeaderError(f"the payload ({payload.size} bytes) holds no data sectors")
        self.parts: list[tuple[int, int, BlockDevice]] = []
        for p in state.pieces:
            end = min(p.start + p.segment.size, self.size) if p.segment.size is not None \
                else self.size
            if end <= p.start:
                continue
            if p.digest is None:
                dev: BlockDevice = _Window(payload, p.segment.offset, end - p.start,
                                           not read_only)
            else:
                dev = LuksDevice(payload, vol, self._keys[p.digest], read_only=read_only,
                                 allow_discards=allow_discards, attached=attached,
                                 rmw_lock=self._rmw, segment=p.segment, size=end - p.start)
            self.parts.append((p.start, end, dev))
        crypt = [d for _, _, d in self.parts if isinstance(d, LuksDevice)]
        first = crypt[0] if crypt else self.parts[0][2]
        self.caps = first.caps
        self.min_block = max(d.min_block for _, _, d in self.parts)
        self.pref_block = max(d.pref_block for _, _, d in self.parts)
        self.inline_max = min(d.inline_max for _, _, d in self.parts)

    def _route(self, offset: int, length: int) -> Iterator[tuple[BlockDevice, int, int, int]]:
        """(device, its offset, offset in the request, length) per segment touched."""
        for start, end, dev in self.parts:
            lo, hi = max(offset, start), min(offset + length, end)
            if lo < hi:
                yield dev, lo - start, lo - offset, hi - lo

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        for dev, at, b, n in self._route(offset, len(buf)):
            dev.pread_into(buf[b : b + n], at)

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        view = memoryview(buf)
        for dev, at, b, n in self._route(offset, len(view)):
            dev.pwrite(view[b : b + n], at, fua)

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        for dev, at, _, n in self._route(offset, length):
            dev.write_zeroes(at, n, fua=fua)

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        for dev, at, _, n in self._route(offset, length):
            if dev.caps.trim:
                dev.trim(at, n, fua=fua)

    def _cache(self, offset: int, length: int) -> None:
        for dev, at, _, n in self._route(offset, length):
            dev.cache(at, n)

    def may_wait(self, offset: int, length: int, write: bool) -> bool:
        return write and any(d.may_wait(at, n, write) for d, at, _, n in
                             self._route(offset, length))

    def luks_devices(self) -> list[LuksDevice]:
        return [d for _, _, d in self.parts if isinstance(d, LuksDevice)]

    def describe(self) -> dict[str, Any]:
        crypt = [d for _, _, d in self.parts if isinstance(d, LuksDevice)]
        out = crypt[0].describe() if crypt else self.payload.describe()
        return {**out, "reencryption_segments": len(self.parts)}


def open_device(payload: BlockDevice, vol: Volume, key: bytes | bytearray,
                keys: dict[str, bytearray] | None = None, *, rotating: bool = False,
                **options: Any) -> BlockDevice:
    """The plaintext view of a volume: one key, or a volume in reencryption
    (`rotating`: one that this server moves on)."""
    if vol.reencryption is not None:
        if rotating:
            return RotatingDevice(payload, vol, keys or {}, **options)
        return SegmentedDevice(payload, vol, keys or {}, **options)
    return LuksDevice(payload, vol, key, **options)
