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

# Smaller buffers come cheaply from malloc's free lists.
MIN_POOLED = 64 * 1024
# Buffers returned while still viewed, retried later; beyond this many the
# oldest are left to the garbage collector.
_MAX_WAITING = 256


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
        if self._free_bytes + len(buf) <= self.max_bytes:
            self._free[len(buf)].append(buf)
            self._free_bytes += len(buf)
