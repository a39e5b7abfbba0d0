"""An export of another NBD server as a BlockDevice.

With `UpstreamOptions.reconnect` seconds, a connection that dies is replaced and the
requests that were on it are sent again (reads and writes are idempotent);
the export must come back with the same size. Writes acknowledged on the
old connection but not yet flushed may have been lost with the upstream's
cache, so the next FLUSH after such a reconnect fails with EIO once, as
Linux reports a lost writeback to the next fsync.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass

import structlog

from ..block.base import BlockDevice, Buffer, Capabilities
from .client import NbdClient, NbdClientError, UpstreamLost
from .constants import FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE, Cmd, TxFlag
from .uri import NbdUri

log = structlog.get_logger("nbdluks.upstream")


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
        self._lock = threading.Lock()
        self._writes = 0  # writes acknowledged so far
        self._flushed = 0  # ... of which a FLUSH covered this many
        self._durability_lost = False
        # After a reconnect window ran out, requests fail at once (after one
        # connection attempt each) instead of each waiting a window again.
        self._gave_up = False
        self.client = c = NbdClient(uri, request_timeout=options.timeout,
                                    connect_timeout=options.connect_timeout)
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
            except UpstreamLost:
                if self.options.reconnect <= 0:
                    raise
                if deadline is None:
                    deadline = time.monotonic() + (0.0 if self._gave_up else self.options.reconnect)
                self._replace(client, deadline)
                continue
            if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and not flags & FLAG_FUA:
                with self._lock:
                    self._writes += 1
            return

    def _replace(self, dead: NbdClient, deadline: float) -> None:
        """Connect again (one thread does it, the others wait and retry)."""
        with self._lock:
            if self.client is not dead:
                return
            log.warning("upstream connection lost, reconnecting", uri=str(self.uri),
                        seconds=self.options.reconnect)
            delay = 0.1
            while True:
                wait = max(0.1, min(self.options.connect_timeout, deadline - time.monotonic()))
                try:
                    new = NbdClient(self.uri, request_timeout=self.options.timeout,
                                    connect_timeout=wait)
                    break
                except NbdClientError as e:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._gave_up = True
                        raise UpstreamLost(errno.EIO, f"{e} (gave up reconnecting after "
                                           f"{self.options.reconnect:.0f} s)") from None
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, 1.0)
            if new.size != self.size or (self.caps.writable and new.flags & TxFlag.READ_ONLY):
                new.close()
                raise UpstreamLost(errno.EIO, f"upstream {self.uri} came back as a different "
                                   f"export (size {new.size}, was {self.size})")
            if self._writes > self._flushed:
                self._durability_lost = True
            self.client = new
            self._gave_up = False
        log.warning("upstream reconnected", uri=str(self.uri))
        dead.close()

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        for o, n in self._pieces(offset, len(buf)):
            self._call(Cmd.READ, o, n, buf=buf[o - offset : o - offset + n])

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        view = memoryview(buf)
        flags = FLAG_FUA if fua else 0
        for o, n in self._pieces(offset, len(buf)):
            self._call(Cmd.WRITE, o, n, flags=flags, data=view[o - offset : o - offset + n])

    def _flush(self) -> None:
        with self._lock:
            covered = self._writes
        self._call(Cmd.FLUSH, 0, 0)
        with self._lock:
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
        self.client.close()
