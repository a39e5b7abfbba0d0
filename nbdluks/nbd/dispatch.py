"""Where a request's device work runs, and how its result gets back.

Small requests that the device says are quick run on the event loop: a hop
to a worker thread costs more than they do. The rest run on a thread pool
(pread, pwrite and the ciphers release the GIL). Completions from the
threads return to the loop in batches, one wake-up per batch, and each
owner is told when a batch ends so that it can send its replies in one
write.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from ..block import BlockDevice
from .commands import Frames, execute
from .constants import FLAG_FUA, Cmd
from .handshake import Negotiated
from .wire import Request

Result = Frames | BaseException
T = TypeVar("T")

# When INLINE_SLOW_RUN inline requests in a row each take longer than
# INLINE_SLOW, inlining stops for INLINE_BACKOFF seconds: the storage is slow
# right now (cold cache, busy disk) and the loop must not block on it. One
# slow request, however slow, never does: on a loaded machine the scheduler
# preempts the loop for milliseconds now and then, and sending every small
# request to the threads for seconds after each such hiccup made the same
# run of small reads many times slower from one run to the next.
INLINE_SLOW = 0.001
INLINE_SLOW_RUN = 4
INLINE_BACKOFF = 1.0


class Owner(Protocol):
    """Who submitted a request: told of its result on the loop."""

    def complete(self, req: Request, result: Result) -> None: ...

    def end_batch(self) -> None: ...


class Dispatcher:
    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int) -> None:
        self.loop = loop
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nbd-io")
        # True while a batch of completions is being handed out: owners
        # queue their replies until end_batch().
        self.batching = False
        self.running = 0  # requests on the threads, or their completions not handed out
        self._done: collections.deque[tuple[Owner, Request, Result]] = collections.deque()
        self._wakeup_lock = threading.Lock()
        self._wakeup_pending = False
        self._inline_off_until = 0.0
        self._inline_slow = 0  # inline requests slower than INLINE_SLOW in a row

    def submit(self, owner: Owner, dev: BlockDevice, req: Request, neg: Negotiated) -> None:
        """Run a valid request; `owner.complete` gets its result on the loop
        (at once when it ran inline)."""
        if self.may_inline(dev, req):
            owner.complete(req, self.run_inline(dev, req, neg))
        else:
            self.running += 1
            self.executor.submit(self._work, owner, dev, req, neg)

    def may_inline(self, dev: BlockDevice, req: Request) -> bool:
        return (
            req.length <= dev.inline_max
            and req.cmd in (Cmd.READ, Cmd.WRITE)
            and not req.flags & FLAG_FUA
            and self.inline_open()
            and not ((req.cmd == Cmd.WRITE or dev.reads_may_wait)
                     and dev.may_wait(req.offset, req.length, req.cmd == Cmd.WRITE))
        )

    def inline_open(self) -> bool:
        """Whether quick requests may run on the loop now (see INLINE_SLOW)."""
        return self.loop.time() >= self._inline_off_until

    def run_inline(self, dev: BlockDevice, req: Request, neg: Negotiated) -> Result:
        t = time.perf_counter()
        try:
            return execute(dev, req, neg)
        except Exception as e:
            return e
        finally:
            self.ran_inline(time.perf_counter() - t)

    def ran_inline(self, seconds: float) -> None:
        """A request took `seconds` on the loop (for a run of them: each)."""
        if seconds <= INLINE_SLOW:
            self._inline_slow = 0
        else:
            self._inline_slow += 1
            if self._inline_slow >= INLINE_SLOW_RUN:
                self._inline_off_until = self.loop.time() + INLINE_BACKOFF
                self._inline_slow = 0

    async def call(self, fn: Callable[[], T]) -> T:
        """Run blocking work (a final flush) on the pool."""
        return await self.loop.run_in_executor(self.executor, fn)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)

    def _work(self, owner: Owner, dev: BlockDevice, req: Request, neg: Negotiated) -> None:
        result: Result
        try:
            result = execute(dev, req, neg)
        except BaseException as e:  # reported on the loop, never lost
            result = e
        self._done.append((owner, req, result))
        with self._wakeup_lock:
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        """On the loop: hand out every completion that arrived, as one batch."""
        with self._wakeup_lock:
            self._wakeup_pending = False
        owners: set[Owner] = set()
        self.batching = True
        try:
            while self._done:
                owner, req, result = self._done.popleft()
                self.running -= 1
                owner.complete(req, result)
                owners.add(owner)
        finally:
            self.batching = False
            for owner in owners:
                owner.end_batch()
