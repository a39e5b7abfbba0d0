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
from typing import Protocol

# Smaller buffers come cheaply from malloc's free lists.
MIN_POOLED = 64 * 1024
# Buffers returned while still viewed, retried later; beyond this many the
# oldest are left to the garbage collector.
_MAX_WAITING = 256


def size_class(size: int) -> int:
    """The power of two at or above `size` (small sizes are not pooled)."""
    return size if size < MIN_POOLED else 1 << (size - 1).bit_length()


class Account(Protocol):
    """What one connection holds of the budget (kept by the budget)."""

    held: int


class MemoryBudget:
    """Bytes of request data one server process holds (read buffers until
    their reply has left, write data as it arrives until it is written),
    charged to the connection that holds them.

    Half the limit is a reserve split evenly among the connections the
    process may hold: a connection always has its share, whatever the others
    hold, so that clients that do not read their replies (or send data
    slowly) cannot take the budget from the rest. What a connection holds
    beyond its share comes from the other half, shared first come first
    served; past it, that connection's reads wait and it stops reading, and
    it is told when room is made.

    A WRITE half in that finds the budget spent may still take its data (it
    cannot move otherwise), but only one connection at a time: the
    overdraft is bounded by one WRITE, and ends when its data is all in."""

    def __init__(self, limit: int, connections: int = 1) -> None:
        self.limit = limit
        self.reserve = limit // 2 // max(1, connections)
        self.shared_limit = limit - self.reserve * max(1, connections)
        self.used = 0
        self.shared_used = 0  # held beyond the connections' reserves
        self.overdraft: Account | None = None
        self._waiting: set[Callable[[], None]] = set()

    def room(self, acct: Account) -> bool:
        """Whether `acct` may take more (its reserve, or the shared part)."""
        return acct.held < self.reserve or self.shared_used < self.shared_limit

    def allows(self, acct: Account, n: int) -> bool:
        held, reserve = acct.held, self.reserve
        if held + n <= reserve:
            return True
        excess = held + n - reserve - (held - reserve if held > reserve else 0)
        # Alone, a request larger than the shared part still runs.
        return self.shared_used == 0 or self.shared_used + excess <= self.shared_limit

    def charge(self, acct: Account, n: int) -> None:
        before = acct.held
        acct.held = after = before + n
        self.used += n
        reserve = self.reserve
        if after > reserve:
            self.shared_used += after - reserve - (before - reserve if before > reserve else 0)

    def release(self, acct: Account, n: int) -> None:
        before = acct.held
        acct.held = after = before - n
        self.used -= n
        reserve = self.reserve
        if before > reserve:
            self.shared_used -= before - reserve - (after - reserve if after > reserve else 0)
        if self._waiting and self.shared_used < self.shared_limit:
            self._wake_all()

    def overdraw(self, acct: Account) -> bool:
        """`acct` may go past the budget until end_overdraft (one at a time)."""
        if self.overdraft is None:
            self.overdraft = acct
        return self.overdraft is acct

    def end_overdraft(self, acct: Account) -> None:
        if self.overdraft is acct:
            self.overdraft = None
            if self._waiting:
                self._wake_all()

    def wait(self, wake: Callable[[], None]) -> None:
        """Call `wake` (once) when some of the budget is released."""
        self._waiting.add(wake)

    def _wake_all(self) -> None:
        waiting, self._waiting = self._waiting, set()
        for wake in waiting:
            wake()


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
