"""The BlockDevice contract: what every source and filter offers the server.

Methods are synchronous and run on worker threads (one hop per request);
failures are `OSError`s whose errno the server maps to an NBD error.
Capabilities are off unless a layer turns them on, so an operation a layer
does not understand can never pass through it (a crypto layer must never let
an unknown write reach the payload as plaintext).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Capabilities:
    writable: bool = False
    flush: bool = False
    fua: bool = False
    trim: bool = False
    zero: bool = False
    fast_zero: bool = False
    extents: bool = False
    cache: bool = False
    # Every connection sees the others' completed writes and a FLUSH on one
    # covers all: true for one process serving one backing store.
    multi_conn: bool = False


@dataclass(frozen=True, slots=True)
class Extent:
    length: int
    hole: bool = False
    zero: bool = False


def unsupported(what: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{what} is not supported by this device")


class BlockDevice:
    """Base class: a fixed-size byte range with optional operations."""

    size: int = 0
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 0  # 0: no limit of its own (the protocol layer caps requests)
    caps: Capabilities = Capabilities()
    # Requests up to this many bytes are quick enough (page cache, CPU only)
    # to run on the event loop instead of a worker thread; 0: never.
    inline_max: int = 0

    def pread_into(self, buf: memoryview, offset: int) -> None:
        raise unsupported("read")

    def pwrite(
        self, buf: bytes | bytearray | memoryview, offset: int, fua: bool = False, *,
        owned: bool = False,
    ) -> None:
        """Write `buf` at `offset`. With `owned` the caller gives `buf` up and
        a layer may use it as scratch space (encrypt it in place)."""
        raise unsupported("write")

    def flush(self) -> None:
        raise unsupported("flush")

    def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        raise unsupported("write zeroes")

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise unsupported("trim")

    def cache(self, offset: int, length: int) -> None:
        raise unsupported("cache")

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least [offset, offset+length): all data by default."""
        return [Extent(length)]

    def read_extents(self, offset: int, length: int) -> list[Extent] | None:
        """Extents for a READ that may skip holes, or None when finding them
        would cost more than sending zeroes."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_range(dev: BlockDevice, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > dev.size:
        raise OSError(errno.EINVAL, "range outside the device")


def zero_fill(dev: BlockDevice, offset: int, length: int, fua: bool, chunk: int = 1 << 20) -> None:
    """Write zeroes with ordinary writes: the slow path, never 'fast'."""
    zeros = bytes(min(chunk, length))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        dev.pwrite(memoryview(zeros)[:n], offset, fua=False)
        offset += n
    if fua:
        dev.flush()
