"""Reusable request buffers.

A fresh large bytearray costs more than the AES over it: the kernel maps
and zeroes new pages on first touch and bytearray() zeroes them again. The
pool hands out buffers of earlier requests instead.

A buffer is taken back only when nothing views it any more: uvloop holds the
reply's memoryviews until the socket has taken the bytes, and the upstream
client holds one while it receives into it. A bytearray with live views
cannot be resized, which is the test. Only the loop thread uses a pool.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

# Smaller buffers come cheaply from malloc's free lists.
MIN_POOLED = 64 * 1024
# Buffers returned while still viewed, retried later; beyond this many the
# oldest are left to the garbage collector.
_MAX_WAITING = 256


def size_class(size: int) -> int:
    """The power of two at or above `size` (small sizes are not pooled)."""
    return size if size < MIN_POOLED else 1 << (size - 1).bit_length()


class MemoryBudget:
    """Bytes of request data one server process holds (read buffers until
    their reply has left, write data until it is written), shared by all
    its connections. Past the limit, reads wait and connections stop
    reading; a connection that waits is told when room is made."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiting: set[Callable[[], None]] = set()

    @property
    def full(self) -> bool:
        return self.used >= self.limit

    def allows(self, n: int) -> bool:
        # Alone, a request larger than the whole budget still runs.
        return self.used == 0 or self.used + n <= self.limit

    def charge(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        if self._waiting and not self.full:
            waiting, self._waiting = self._waiting, set()
            for wake in waiting:
                wake()

    def wait(self, wake: Callable[[], None]) -> None:
        """Call `wake` (once) when some of the budget is released."""
        self._waiting.add(wake)


def viewed(buf: bytearray) -> bool:
    """Whether some memoryview (or other buffer export) of `buf` is alive."""
    try:
        buf.append(0)
    except BufferError:
        return True
    del buf[-1]
    return False


class BufferPool:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = collections.defaultdict(list)
        self._free_bytes = 0
        self._waiting: collections.deque[bytearray] = collections.deque()

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    def get(self, size: int) -> bytearray:
        """A buffer of exactly `size` bytes; its contents are undefined."""
        free = self._free.get(size)
        if free:
            self._free_bytes -= size
            return free.pop()
        return bytearray(size)

    def get_at_least(self, size: int) -> bytearray:
        """A buffer of `size` bytes or more (its size class), for reads."""
        return self.get(size_class(size))

    def put(self, buf: bytearray) -> None:
        """Give `buf` back; it is reused once nothing views it."""
        if len(buf) < MIN_POOLED:
            return
        self._retry_waiting()
        if viewed(buf):
            if len(self._waiting) >= _MAX_WAITING:
                self._waiting.popleft()
            self._waiting.append(buf)
        else:
            self._keep(buf)

    def _retry_waiting(self) -> None:
        for _ in range(len(self._waiting)):
            buf = self._waiting.popleft()
            if viewed(buf):
                self._waiting.append(buf)
            else:
                self._keep(buf)

    def _keep(self, buf: bytearray) -> None:
        # Only size classes are kept: under random request sizes, buffers of
        # one exact size each would never be asked for again.
        if len(buf) == size_class(len(buf)) and self._free_bytes + len(buf) <= self.max_bytes:
            self._free[len(buf)].append(buf)
            self._free_bytes += len(buf)
