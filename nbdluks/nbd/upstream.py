"""An export of another NBD server as a BlockDevice.

A connection that dies is replaced in the background, with backoff, until
the upstream is back; meanwhile requests fail with EIO, or wait up to
`UpstreamOptions.reconnect` seconds for the new connection and are sent
again (reads and writes are idempotent). The export must come back with the
same size. Writes acknowledged on the old connection but not yet flushed
may have been lost with the upstream's cache, so the next FLUSH after such a
reconnect fails with EIO once, as Linux reports a lost writeback to the next
fsync.
"""

from __future__ import annotations

import contextvars
import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..block import BlockDevice, Buffer, Capabilities
from .client import NbdClient, NbdClientError, UpstreamLost
from .constants import FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE, Cmd, TxFlag
from .uri import NbdUri

log = structlog.get_logger("nbdluks.upstream")

# Seconds between attempts to reconnect: doubling from the first to the last.
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
# How long a request waits for the attempt it asked for before it fails.
_GRACE = 0.5
# While unreachable, one log line every this many attempts.
_LOG_EVERY = 12


@dataclass(frozen=True)
class UpstreamOptions:
    """How NBD sources are treated."""

    # Seconds an upstream may take to answer a request before its connection
    # counts as dead (every request on it then fails with EIO).
    timeout: float = 60.0
    # Seconds to keep trying to get a dead connection back (0: fail with EIO).
    reconnect: float = 0.0
    # Seconds to wait for a connection (and its negotiation) to be made.
    connect_timeout: float = 10.0


class NbdDevice(BlockDevice):
    def __init__(self, uri: NbdUri, *, read_only: bool = False,
                 options: UpstreamOptions = UpstreamOptions()) -> None:
        self.uri = uri
        self.options = options
        self.read_only = read_only
        self._cond = threading.Condition()
        self._writes = 0  # writes acknowledged so far
        self._flushed = 0  # ... of which a FLUSH covered this many
        self._durability_lost = False
        # While the connection is down a thread makes a new one (never more
        # than one thread). After a reconnect window ran out, requests fail at
        # once instead of each waiting a window again; so they do while the
        # export came back as another one.
        self._reconnecting = False
        self._gave_up = False
        self._different = False
        self._closed = threading.Event()
        self._poke = threading.Event()
        self._report: Callable[[bool], object] = lambda up: None
        # The reconnecting thread logs with the opener's context (its worker).
        self._context = contextvars.copy_context()
        self.client = c = self._connect()
        self.size = c.size
        self.min_block = c.min_block or 1
        self.pref_block = c.pref_block or 4096
        self.max_block = c.max_block
        f = c.flags
        writable = not read_only and not f & TxFlag.READ_ONLY
        self.caps = Capabilities(
            writable=writable,
            flush=bool(f & TxFlag.SEND_FLUSH),
            fua=writable and bool(f & TxFlag.SEND_FUA),
            trim=writable and bool(f & TxFlag.SEND_TRIM),
            zero=writable and bool(f & TxFlag.SEND_WRITE_ZEROES),
            fast_zero=writable and bool(f & TxFlag.SEND_FAST_ZERO),
            cache=bool(f & TxFlag.SEND_CACHE),
            # All our connections share this one upstream connection, so a
            # FLUSH on it covers every write any of them completed.
            multi_conn=True,
        )
        # Our processes each open their own connection: only an upstream that
        # promises multi-conn makes a FLUSH on one cover the others' writes.
        self.multi_open = bool(f & TxFlag.CAN_MULTI_CONN)
        self.has_upstream = True

    def _connect(self) -> NbdClient:
        # A connection that dies while no request waits on it is replaced too.
        return NbdClient(self.uri, request_timeout=self.options.timeout,
                         connect_timeout=self.options.connect_timeout,
                         on_lost=self._start_reconnecting)

    def watch(self, report: Callable[[bool], object]) -> None:
        self._report = report
        report(not self._reconnecting)

    def before_fork(self) -> None:
        # The connection's threads would not survive the fork: each worker
        # makes its own connection.
        self.close()

    def reopen(self) -> NbdDevice:
        return NbdDevice(self.uri, read_only=self.read_only, options=self.options)

    def __reduce__(self) -> Any:
        """A running worker connects anew, as reopen() does."""
        return _passed, (self.uri, self.read_only, self.options)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.max_block
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    # --- requests, retried across reconnects -----------------------------

    def _call(self, cmd: int, offset: int, length: int, *, flags: int = 0,
              data: memoryview | None = None, buf: memoryview | None = None) -> None:
        deadline = None
        while True:
            client = self.client
            try:
                client.request(cmd, offset, length, flags=flags, data=data, buf=buf)
            except UpstreamLost as e:
                self._start_reconnecting(client)
                if deadline is None:
                    window = 0.0 if self._gave_up else self.options.reconnect
                    deadline = time.monotonic() + window
                # Sent again only within the window (0: only what never left).
                resend = not e.sent or time.monotonic() < deadline
                if not (resend and self._await_new(client, deadline)):
                    if self.options.reconnect > 0:
                        self._gave_up = True  # until it is back, fail at once
                    raise UpstreamLost(errno.EIO, f"{e.strerror} (reconnecting)") from None
                continue
            if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and not flags & FLAG_FUA:
                with self._cond:
                    self._writes += 1
            return

    def _start_reconnecting(self, dead: NbdClient) -> None:
        with self._cond:
            if (getattr(self, "client", None) is not dead or self._reconnecting
                    or self._closed.is_set()):
                return
            self._reconnecting = True
        self._report(False)
        threading.Thread(target=self._context.copy().run, args=(self._reconnect, dead),
                         name="nbd-reconnect", daemon=True).start()

    def _await_new(self, dead: NbdClient, deadline: float) -> bool:
        """Wait until a new connection replaced `dead`, or the deadline (at
        least the time one attempt may take, which this asks for now)."""
        self._poke.set()
        end = max(deadline, time.monotonic() + _GRACE)
        with self._cond:
            while self.client is dead:
                remaining = end - time.monotonic()
                if remaining <= 0 or self._different:
                    return False
                self._cond.wait(remaining)
        return True

    def _reconnect(self, dead: NbdClient) -> None:
        """In the background: connect again, with backoff, until it works."""
        log.warning("upstream connection lost, reconnecting", uri=str(self.uri),
                    wait=self.options.reconnect)
        delay, attempts, since = _BACKOFF_MIN, 0, time.monotonic()
        while not self._closed.is_set():
            # Backoff, cut short by a request that wants an attempt now, but
            # never more than one attempt per _BACKOFF_MIN.
            if attempts:
                self._poke.wait(delay)
                if self._closed.wait(_BACKOFF_MIN):
                    break
            self._poke.clear()
            attempts += 1
            delay = min(2 * delay, _BACKOFF_MAX)
            try:
                new = self._connect()
            except NbdClientError as e:
                if attempts % _LOG_EVERY == 0:
                    log.warning("upstream still unreachable", uri=str(self.uri), error=str(e),
                                attempts=attempts, seconds=round(time.monotonic() - since))
                continue
            if new.size != self.size or (self.caps.writable and new.flags & TxFlag.READ_ONLY):
                new.close()
                if not self._different:
                    log.error("upstream came back as a different export", uri=str(self.uri),
                              size=new.size, was=self.size)
                with self._cond:
                    self._different = True
                    self._cond.notify_all()
                continue
            with self._cond:
                if self._closed.is_set():  # closed while we connected
                    new.close()
                    return
                if self._writes > self._flushed:
                    self._durability_lost = True
                self.client = new
                self._gave_up = self._different = self._reconnecting = False
                self._cond.notify_all()
            self._report(True)
            log.warning("upstream reconnected", uri=str(self.uri), attempts=attempts)
            dead.close()
            return

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        for o, n in self._pieces(offset, len(buf)):
            self._call(Cmd.READ, o, n, buf=buf[o - offset : o - offset + n])

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        view = memoryview(buf)
        flags = FLAG_FUA if fua else 0
        for o, n in self._pieces(offset, len(buf)):
            self._call(Cmd.WRITE, o, n, flags=flags, data=view[o - offset : o - offset + n])

    def _flush(self) -> None:
        with self._cond:
            covered = self._writes
        self._call(Cmd.FLUSH, 0, 0)
        with self._cond:
            self._flushed = max(self._flushed, covered)
            lost, self._durability_lost = self._durability_lost, False
        if lost:
            raise OSError(errno.EIO, "writes acknowledged before the upstream connection was "
                          "re-established may not have reached stable storage")

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        flags = FLAG_FUA if fua else 0
        for o, n in self._pieces(offset, length):
            self._call(Cmd.TRIM, o, n, flags=flags)

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        flags = ((FLAG_FUA if fua else 0) | (0 if may_trim else FLAG_NO_HOLE)
                 | (FLAG_FAST_ZERO if fast else 0))
        for o, n in self._pieces(offset, length):
            self._call(Cmd.WRITE_ZEROES, o, n, flags=flags)

    def _cache(self, offset: int, length: int) -> None:
        for o, n in self._pieces(offset, length):
            self._call(Cmd.CACHE, o, n)

    def close(self) -> None:
        self._closed.set()
        self._poke.set()
        self.client.close()


def _passed(uri: NbdUri, read_only: bool, options: UpstreamOptions) -> NbdDevice:
    return NbdDevice(uri, read_only=read_only, options=options)
