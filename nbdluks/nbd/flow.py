"""Flow control of one connection: what it may start, when it stops reading,
and what it holds of the server's memory budget and buffers.

Reading pauses while the connection's requests in flight reach their cap,
while decoded requests wait to start, while the client does not take its
replies, and while the connection has no room left in the server's memory
budget (its reserve and the shared part spent). The connection consults
this object; it touches no socket itself, only what it is handed to pause.
It also notes since when the connection has waited on its client (replies
not taken, reading not paused by us), for the stall limit."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .buffers import BufferPool, MemoryBudget, size_class
from .constants import Cmd
from .wire import Request

# What a request costs against the in-flight cap beyond its data, so that a
# flood of tiny requests is bounded too.
REQUEST_OVERHEAD = 4096


def cost(req: Request) -> int:
    return REQUEST_OVERHEAD + (req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0)


class Readable(Protocol):
    """The side of a transport that flow control pauses."""

    def is_closing(self) -> bool: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Flow:
    def __init__(self, max_inflight: int, budget: MemoryBudget, buffers: BufferPool,
                 wake: Callable[[], None]) -> None:
        self.max_inflight = max_inflight
        self.budget = budget
        self.buffers = buffers
        self._wake = wake  # called (once) when the budget has room again
        self.inflight = 0  # requests the device is working on
        self.inflight_bytes = 0  # their cost
        # Read buffers whose replies the transport still holds, charged to
        # the budget until it has sent them.
        self._unsent = 0
        self.write_paused = False  # the client does not take its replies
        self.read_paused = False
        self.held = 0  # bytes of the budget held (buffers.Account)
        # time.monotonic() when the client last stopped taking replies, and
        # when reading last resumed after a pause of ours
        self.write_paused_at = self.read_resumed_at = 0.0

    @property
    def gated(self) -> bool:
        """No new work while replies wait for the client or the cap is reached."""
        return self.write_paused or self.inflight_bytes >= self.max_inflight

    def may_start(self, req: Request) -> bool:
        if self.gated:
            return False
        if req.cmd == Cmd.READ and not self.budget.allows(self, size_class(req.length)):
            self.budget.wait(self._wake)
            return False
        return True

    def started(self, req: Request) -> None:
        """A valid request goes to the device: a READ gets its buffer."""
        if req.cmd == Cmd.READ:
            req.buffer = self.buffers.get_at_least(req.length)
            self.budget.charge(self, len(req.buffer))
        self.inflight += 1
        self.inflight_bytes += cost(req)

    def finished(self, req: Request) -> None:
        """The device is done with a request (its buffers are not given back yet)."""
        self.inflight -= 1
        self.inflight_bytes -= cost(req)

    # --- the memory budget ----------------------------------------------------------

    def data_in(self, n: int) -> None:
        """`n` bytes of WRITE data came in: charged as they arrive."""
        self.budget.charge(self, n)

    def give_back(self, req: Request) -> None:
        """A request is over: its buffers go back to the pool, a write's data
        off the budget (a read's buffer when its reply has left)."""
        if req.data is not None:
            self.budget.release(self, len(req.data))
            self.buffers.put(req.data)
        if req.buffer is not None:
            self._unsent += len(req.buffer)
            self.buffers.put(req.buffer)
        req.buffer = req.data = None

    @property
    def holds_replies(self) -> bool:
        """Replies wait in the transport: charged, or not taken by the client."""
        return self._unsent > 0 or self.write_paused

    def replies_out(self, n: int) -> None:
        """`n` bytes of replies made without a request of their own (the
        fast path) wait in the transport: charged until it has sent them."""
        self.budget.charge(self, n)
        self._unsent += n

    def drop_partial(self, held: int) -> None:
        """The stream ended inside a WRITE's data: off the budget with it."""
        if held:
            self.budget.release(self, held)
        self.budget.end_overdraft(self)

    def release_unsent(self) -> None:
        """The transport has sent the replies (or never will): their read
        buffers leave the budget."""
        if self._unsent:
            n, self._unsent = self._unsent, 0
            self.budget.release(self, n)

    # --- the transport ------------------------------------------------------------

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = time.monotonic()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.release_unsent()  # below the low-water mark: as good as sent

    def update_reading(self, t: Readable | None, hold: bool, mid_write: bool) -> None:
        """Pause or resume reading from `t`. `hold`: the connection takes no
        request now (it is closing, or decoded ones wait to start);
        `mid_write`: a WRITE's data is partly in."""
        if t is None or t.is_closing():
            return
        # Decoded requests that wait in the backlog are bounded by one
        # read's worth of bytes: stop reading until they have started. With
        # no room in the budget, stop too, unless a WRITE's data is half in
        # and this connection may overdraw (it must arrive for anything to
        # move; one connection at a time, until that WRITE is in).
        budget = self.budget
        pause = hold or self.gated
        if budget.overdraft is self and not mid_write:
            budget.end_overdraft(self)
        if (not pause and self.held >= budget.reserve and budget.shared_used >= budget.shared_limit
                and not (mid_write and budget.overdraw(self))):  # no room (budget.room)
            pause = True
            budget.wait(self._wake)
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                t.pause_reading()
            else:
                self.read_resumed_at = time.monotonic()
                t.resume_reading()

    def stalled(self, now: float, limit: float, mid_write: bool, received_at: float,
                ) -> str | None:
        """What this connection has waited on its client for longer than
        `limit` seconds, if anything: replies it does not take, or WRITE
        data that stopped coming (`received_at`: when bytes last came) while
        we were reading."""
        if self.write_paused and now - self.write_paused_at > limit:
            return "replies not read"
        if (mid_write and not self.read_paused
                and now - max(received_at, self.read_resumed_at) > limit):
            return "WRITE data stalled"
        return None
