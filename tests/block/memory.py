"""A BlockDevice over a bytearray, for driving the pure layers directly.

It implements the device side of the contract (the underscore methods) and
records what reached it, so tests can see what the contract let through."""

from __future__ import annotations

from nbdluks.block.base import BlockDevice, Buffer, Capabilities, Extent


class MemoryDevice(BlockDevice):
    def __init__(self, size: int, caps: Capabilities | None = None) -> None:
        self.data = bytearray(size)
        self.size = size
        self.caps = caps or Capabilities(writable=True, flush=True, fua=True, trim=True,
                                         zero=True, fast_zero=True, extents=True, cache=True)
        self.calls: list[tuple[object, ...]] = []
        self.holes: list[tuple[int, int]] = []  # what _extents reports as holes

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        self.calls.append(("read", offset, len(buf)))
        buf[:] = self.data[offset : offset + len(buf)]

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        self.calls.append(("write", offset, len(buf), fua))
        self.data[offset : offset + len(buf)] = buf

    def _flush(self) -> None:
        self.calls.append(("flush",))

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        self.calls.append(("zero", offset, length, fua, may_trim, fast))
        self.data[offset : offset + length] = bytes(length)

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        self.calls.append(("trim", offset, length, fua))

    def _cache(self, offset: int, length: int) -> None:
        self.calls.append(("cache", offset, length))

    def _extents(self, offset: int, length: int) -> list[Extent]:
        out, pos, end = [], offset, offset + length
        for start, n in sorted(self.holes):
            if start + n <= pos or start >= end:
                continue
            if start > pos:
                out.append(Extent(start - pos))
            hole_end = min(start + n, end)
            out.append(Extent(hole_end - max(start, pos), hole=True, zero=True))
            pos = hole_end
        if pos < end:
            out.append(Extent(end - pos))
        return out

    def _read_extents(self, offset: int, length: int) -> list[Extent] | None:
        return self._extents(offset, length)
