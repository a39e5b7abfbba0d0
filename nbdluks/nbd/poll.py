"""Busy polling: after a connection's replies have left, its next request
is awaited on the CPU for a few microseconds before the event loop sleeps.

At queue depth 1 most of a request's latency is the wake-up of the idle CPU
the server sleeps on, not the work (measured here, 4 KiB LUKS reads: p50
51 us sleeping in epoll_wait, 18-27 us polling; nbdkit 50-52). Linux's
hybrid block polling and SPDK's pollers make the same trade of CPU for
latency; this one makes it only while it pays:

- a connection polls only after a run of replies the fast path answered,
  with nothing else of it in flight, reading not paused;
- a client that sends a request before it has the reply to the last one
  (several requests in one read) is not waiting on us: polling would only
  cut its batches into single requests (measured: 4 KiB reads at queue
  depth 16 fell from 124k to 81k a second). That, or a poll that comes back
  empty, turns polling off for the connection until COOLDOWN requests in a
  row have each come alone and soon after the reply before them (a slow,
  idle or pipelining client costs one wasted poll, not one per request);
- a poll gives way at once when another connection of the process has
  bytes (one epoll set of every polling socket) or requests of this
  process run on its I/O threads (their completions wait for the loop).

The CPU it spends shows in the metrics (busy_poll_seconds_total)."""

from __future__ import annotations

import contextlib
import select
import time

from . import fastpath
from .stats import Stats

COOLDOWN = 8
# A request arriving through the event loop this long after the replies
# before it (in poll budgets) counts as soon: the loop's own wake-up is in it.
SOON = 2


class Poller:
    """The busy polling of one server process: its budget, and the epoll
    set of its polling connections' sockets."""

    def __init__(self, budget_us: int) -> None:
        self.budget_ns = budget_us * 1000 if fastpath.AVAILABLE else 0
        self._ep: select.epoll | None = None

    def watch(self, sock: int) -> Poll:
        """Polling for the connection on socket `sock` (-1, or no budget: never)."""
        if sock < 0 or not self.budget_ns:
            return Poll(self, -1)
        if self._ep is None:
            self._ep = select.epoll()
        with contextlib.suppress(OSError):
            self._ep.register(sock, select.EPOLLIN)
        return Poll(self, sock)

    def forget(self, sock: int) -> None:
        if self._ep is not None:
            with contextlib.suppress(OSError):  # closed already: the kernel dropped it
                self._ep.unregister(sock)

    @property
    def epfd(self) -> int:
        return -1 if self._ep is None else self._ep.fileno()


class Poll:
    """The busy polling of one connection."""

    __slots__ = ("_cool", "_idle_since", "_mark", "_poller", "_sock")

    def __init__(self, poller: Poller, sock: int) -> None:
        self._poller = poller
        self._sock = sock
        self._cool = 0  # requests to come soon before polling again
        self._idle_since = 0  # when the last replies left, ns
        self._mark = 0  # the connection's count of requests when the last bytes came

    def arrived(self, requests: int) -> None:
        """Bytes came through the event loop (not a poll), the connection
        having had `requests` before them."""
        self._mark = requests
        if self._cool and self._idle_since:
            gap = time.perf_counter_ns() - self._idle_since
            soon = gap < SOON * self._poller.budget_ns
            self._cool = self._cool - 1 if soon else COOLDOWN

    def wants(self, requests: int) -> bool:
        """Whether polling pays now, the connection having had `requests`
        (every one answered) when the bytes last received were done."""
        if self._sock < 0:
            return False
        self._idle_since = time.perf_counter_ns()
        if requests - self._mark > 1:  # the client sends before it has its replies
            self._cool = COOLDOWN
        self._mark = requests
        return not self._cool

    def wait(self, stats: Stats) -> bytes | None:
        """The client's next bytes if they come within the budget; None:
        let the event loop wait."""
        poller = self._poller
        start = self._idle_since
        got = fastpath.poll(self._sock, poller.epfd, poller.budget_ns)
        if got is None:  # nothing came: the client is not that quick
            self._cool = COOLDOWN
        now = time.perf_counter_ns()
        stats.polled(now - start, bool(got))
        if not got:
            self._idle_since = now
            return None
        return got

    def close(self) -> None:
        if self._sock >= 0:
            self._poller.forget(self._sock)
            self._sock = -1
