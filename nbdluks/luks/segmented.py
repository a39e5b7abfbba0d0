"""A volume in reencryption as one device: each regular segment read and
written through its own key (a LuksDevice per crypt segment, a window of
the payload per linear one), requests split where segments meet. The
segments are where cryptsetup's clean state says they are; nothing here
moves them."""

from __future__ import annotations

import errno
import pickle
from collections.abc import Callable, Iterator
from typing import Any

from ..block import BlockDevice, Buffer, Capabilities, RangeLock
from .device import LuksDevice
from .errors import HeaderError
from .reencrypt import logical_size
from .rotating import RotatingDevice
from .unlock import wipe
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


class SegmentedDevice(BlockDevice):
    def __init__(self, payload: BlockDevice, vol: Volume, keys: dict[str, bytearray], *,
                 read_only: bool = False, allow_discards: bool = False,
                 attached: bool = False, rmw_lock: RangeLock | None = None) -> None:
        state = vol.reencryption
        assert state is not None
        self.payload, self.vol, self.read_only = payload, vol, read_only
        self.allow_discards, self.attached = allow_discards, attached
        self._keys: dict[str, bytearray] | None = {d: bytearray(k) for d, k in keys.items()}
        self._own_lock = rmw_lock is None
        self._rmw = rmw_lock if rmw_lock is not None else RangeLock()
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
        self.multi_open, self.has_upstream = payload.multi_open, payload.has_upstream

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

    def _flush(self) -> None:
        self.payload.flush()

    def may_wait(self, offset: int, length: int, write: bool) -> bool:
        return write and any(d.may_wait(at, n, write) for d, at, _, n in
                             self._route(offset, length))

    # --- life ---------------------------------------------------------------

    def before_fork(self) -> None:
        self.payload.before_fork()

    def reopen(self) -> SegmentedDevice:
        if self._keys is None:
            raise OSError(errno.EOPNOTSUPP, "sealed: the keys are forgotten")
        payload = self.payload.reopen()
        try:
            return SegmentedDevice(payload, self.vol, self._keys, read_only=self.read_only,
                                   allow_discards=self.allow_discards,
                                   attached=self.attached, rmw_lock=self._rmw)
        except BaseException:
            payload.close()
            raise

    def __reduce__(self) -> Any:
        """The arguments that rebuild it in a running worker (see block.Passed)."""
        if self._keys is None:
            raise TypeError("sealed: the keys are forgotten")
        return _passed, (self.payload, self.vol,
                         {d: pickle.PickleBuffer(k) for d, k in self._keys.items()},
                         {"read_only": self.read_only, "allow_discards": self.allow_discards,
                          "attached": self.attached, "rmw_lock": self._rmw})

    def _forget(self) -> None:
        for _, _, dev in self.parts:
            if isinstance(dev, LuksDevice):
                dev.forget_key()
        if self._keys is not None:
            for key in self._keys.values():
                wipe(key)
            self._keys = None

    def seal(self) -> None:
        self._forget()
        self.payload.seal()

    def watch(self, report: Callable[[bool], object]) -> None:
        self.payload.watch(report)

    def describe(self) -> dict[str, Any]:
        crypt = [d for _, _, d in self.parts if isinstance(d, LuksDevice)]
        out = crypt[0].describe() if crypt else self.payload.describe()
        return {**out, "reencryption_segments": len(self.parts)}

    def close(self) -> None:
        self._forget()
        if self._own_lock:
            self._rmw.close()
        self.payload.close()


def _passed(payload: BlockDevice, vol: Volume, keys: dict[str, bytearray],
            options: dict[str, Any]) -> SegmentedDevice:
    dev = SegmentedDevice(payload, vol, keys, **options)
    dev._own_lock = True  # the lock handed over is this process's own object
    return dev


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
