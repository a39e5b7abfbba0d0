"""One client connection: the asyncio protocol that feeds the sans-IO
handshake and request decoder, passes valid requests to the dispatcher and
writes the replies. Flow control lives here: reading pauses while a
connection's requests in flight reach their cap, while decoded requests
wait to start, and while the client does not take its replies."""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from . import stats
from .buffers import BufferPool, MemoryBudget, size_class
from .commands import Export, Frames, errno_to_nbd, error_reply, validate
from .constants import Cmd, Errno, cmd_name, flag_names
from .dispatch import Dispatcher, Result
from .handshake import Handshake, Negotiated, State
from .options import ServerOptions
from .registry import Registry
from .stats import Stats, StatsTable
from .throttle import Throttle
from .tls import peer_str, subject_cn
from .wire import ProtocolError, Request, RequestDecoder

log = structlog.get_logger("nbdluks.server")

# What a request costs against the in-flight cap beyond its data, so that a
# flood of tiny requests is bounded too.
_REQUEST_OVERHEAD = 4096
# Replies queued beyond this many bytes are written at once, so that the
# transport's flow control (pause_writing) still sees them in time.
_REPLY_BATCH = 1024 * 1024


@dataclass(frozen=True)
class Shared:
    """What the connections of one server process share."""

    loop: asyncio.AbstractEventLoop
    exports: Mapping[str, Export]
    options: ServerOptions
    buffers: BufferPool
    budget: MemoryBudget
    dispatcher: Dispatcher
    registry: Registry[Connection]
    throttle: Throttle = field(default_factory=Throttle)
    stats: Stats = field(default_factory=lambda: StatsTable().slot(0))


def _cost(req: Request) -> int:
    return _REQUEST_OVERHEAD + (req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0)


class Connection(asyncio.Protocol):
    _ids = itertools.count(1)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.log = log.bind(conn=next(self._ids))
        self.transport: asyncio.Transport | None = None
        self.handshake = Handshake({n: e.info() for n, e in shared.exports.items()},
                                   shared.options.tls)
        self._tls_task: asyncio.Task[None] | None = None
        self.neg: Negotiated | None = None
        self.export: Export | None = None
        self.decoder = RequestDecoder(alloc=self._alloc_data)
        self.inflight_bytes = 0
        self.inflight = 0
        self._backlog: collections.deque[Request] = collections.deque()
        self._pumping = False
        # Replies wait here while a batch of requests is processed, then go
        # out in one writev: a syscall and a wake-up of the client per reply
        # cost more than the work of a small request.
        self._out: Frames = []
        self._out_bytes = 0
        # Read buffers whose replies the transport still holds, charged to
        # the budget until it has sent them.
        self._unsent = 0
        self.requests = 0
        self.failures = 0  # requests answered with an error by the device
        self.bytes_read = self.bytes_written = 0
        self.closing = False  # DISC seen or server stopping: no new requests
        self._write_paused = False
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()
        self.opened = self.last_active = time.monotonic()

    # --- what the registry asks ------------------------------------------------

    @property
    def negotiating(self) -> bool:
        return self.neg is None

    @property
    def busy(self) -> bool:
        return self.inflight > 0 or bool(self._backlog)

    def evict(self, reason: str) -> None:
        """Close this connection to make room for a new one."""
        self.shared.stats.add(stats.EVICTED)
        held_back = self.shared.throttle.admit(("evicted", reason))
        if held_back is not None:  # a flood would make one line per connection
            self.log.warning("connection closed to make room", reason=reason,
                             idle=round(time.monotonic() - self.last_active, 1),
                             held_back=held_back)
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = t = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or transport.get_extra_info("sockname")
        self.log = self.log.bind(peer=peer_str(peer))
        if not self.shared.registry.admit(self):
            # Each connection may hold max_inflight bytes: a flood of them
            # must not starve the clients already served.
            self.shared.stats.add(stats.REFUSED)
            held_back = self.shared.throttle.admit(("refused",))
            if held_back is not None:
                self.log.warning("connection refused: every slot is busy",
                                 limit=self.shared.registry.limit, held_back=held_back)
            self.closed.set()
            t.abort()  # type: ignore[attr-defined]
            return
        self.shared.stats.opened()
        self.log.debug("connection opened")
        t.write(self.handshake.data_to_send())  # type: ignore[attr-defined]
        self._timer = self.shared.loop.call_later(self.shared.options.handshake_timeout,
                                                  self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.is_set():  # a failed TLS handshake reports it itself
            return
        if self._timer:
            self._timer.cancel()
        self.shared.registry.release(self)
        self.shared.stats.closed()
        self.shared.stats.flush()  # so that what a client did shows once it is gone
        self._release_all()
        # A connection that only negotiated (a probe, a health check) is noise.
        report = self.log.info if self.requests else self.log.debug
        report("connection closed", requests=self.requests, failed=self.failures,
               bytes_read=self.bytes_read, bytes_written=self.bytes_written,
               seconds=round(time.monotonic() - self.opened, 3),
               error=str(exc) if exc else None)
        self.closed.set()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._release_unsent()  # below the low-water mark: as good as sent
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.neg is None:
            self._negotiate(data)
        else:
            self._receive_requests(data)

    # --- negotiation -----------------------------------------------------------

    def _negotiate(self, data: bytes) -> None:
        assert self.transport is not None
        hs = self.handshake
        hs.receive_data(data)
        out = hs.data_to_send()
        if out:
            self.transport.write(out)
        if hs.state is State.CLOSED:
            self.log.debug("negotiation ended", reason=hs.close_reason)
            self.transport.close()
        elif hs.state is State.TLS_START:
            # Not one more byte for the option parser: the next ones are TLS.
            self.transport.pause_reading()
            self._tls_task = self.shared.loop.create_task(self._start_tls())
        elif hs.state is State.DONE:
            self._negotiated()

    def _negotiated(self) -> None:
        hs = self.handshake
        assert hs.result is not None
        if self._timer:
            self._timer.cancel()
        self.neg = hs.result
        self.export = self.shared.exports[self.neg.export.name]
        self.log = self.log.bind(export=self.neg.export.name)
        self.log.debug(
            "export negotiated",
            size=self.neg.export.size,
            structured=self.neg.structured,
            tls=hs.tls_active,
            flags=flag_names(self.neg.flags),
            meta_contexts=sorted(self.neg.meta_contexts.values()),
        )
        if self.closing:
            self._maybe_close()
        elif hs.leftover:
            self._receive_requests(hs.leftover)

    async def _start_tls(self) -> None:
        creds = self.shared.options.credentials
        assert self.transport is not None and creds is not None
        ctx = creds.context
        plain = self.transport
        try:
            tls = await self.shared.loop.start_tls(
                plain, self, ctx, server_side=True,
                ssl_handshake_timeout=self.shared.options.handshake_timeout,
            )
        except Exception as e:  # whatever broke, only this connection ends
            self.log.warning("TLS handshake failed", error=str(e) or type(e).__name__)
            plain.abort()
            self.connection_lost(None)
            return
        if tls is None:  # closed meanwhile
            return
        self.transport = tls
        obj = tls.get_extra_info("ssl_object")
        peer = obj.getpeercert() if obj else None  # set when client certificates are checked
        self.log.info("TLS started", version=obj.version() if obj else None,
                      cipher=obj.cipher()[0] if obj and obj.cipher() else None,
                      client=subject_cn(peer) if peer else None)
        self.handshake.tls_started()

    def _handshake_timeout(self) -> None:
        if self.neg is None and self.transport is not None:
            self.log.warning("negotiation timed out")
            self.transport.close()

    # --- transmission -----------------------------------------------------------

    def _receive_requests(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        try:
            reqs = self.decoder.feed(data)
        except ProtocolError as e:
            self.log.warning("protocol error, closing", error=str(e))
            if self.transport is not None:
                self.transport.abort()
            return
        self._backlog.extend(reqs)
        self._pump()

    def _gated(self) -> bool:
        """No new work while replies wait for the client or the cap is reached."""
        return self._write_paused or self.inflight_bytes >= self.shared.options.max_inflight

    def _may_start(self, req: Request) -> bool:
        if self._gated():
            return False
        if req.cmd == Cmd.READ and not self.shared.budget.allows(size_class(req.length)):
            self.shared.budget.wait(self._wake)
            return False
        return True

    def _wake(self) -> None:
        self.shared.loop.call_soon(self._pump)

    # --- the memory budget ----------------------------------------------------------

    def _alloc_data(self, n: int) -> bytearray:
        """A WRITE's data buffer (the decoder asks as its header arrives)."""
        self.shared.budget.charge(n)
        return self.shared.buffers.get(n)

    def _give_back(self, req: Request) -> None:
        """A request is over: its buffers go back to the pool, a write's data
        off the budget (a read's buffer when its reply has left)."""
        if req.data is not None:
            self.shared.budget.release(len(req.data))
            self.shared.buffers.put(req.data)
        if req.buffer is not None:
            self._unsent += len(req.buffer)
            self.shared.buffers.put(req.buffer)
        req.buffer = req.data = None

    def _release_unsent(self) -> None:
        if self._unsent:
            n, self._unsent = self._unsent, 0
            self.shared.budget.release(n)

    def _release_all(self) -> None:
        """The connection is gone: nothing it holds will be sent."""
        for req in self._backlog:
            self._give_back(req)
        self._backlog.clear()
        pending = self.decoder.abandon()
        if pending is not None:
            self.shared.budget.release(len(pending))
        self._release_unsent()

    def _pump(self) -> None:
        """Start backlog requests while the gate is open; then decide on reading."""
        if self._pumping:  # complete() of an inline request, from inside the loop below
            return
        self._pumping = True
        try:
            while self._backlog and self._may_start(self._backlog[0]):
                self._start(self._backlog.popleft())
        finally:
            self._pumping = False
        if not self.shared.dispatcher.batching:
            self.end_batch()
        self._update_reading()
        self._maybe_close()

    def _send(self, frames: Frames) -> None:
        self._out += frames
        self._out_bytes += sum(len(f) for f in frames)
        if self._out_bytes >= _REPLY_BATCH or not (
            self._pumping or self.shared.dispatcher.batching
        ):
            self.end_batch()

    def end_batch(self) -> None:
        """Write the queued replies, in one writev."""
        if not self._out:
            return
        out, self._out, self._out_bytes = self._out, [], 0
        t = self.transport
        if t is not None and not t.is_closing():
            t.writelines(out)
            del out
            if t.get_write_buffer_size() == 0:
                self._release_unsent()
        else:
            self._release_unsent()

    def _start(self, req: Request) -> None:
        assert self.neg is not None and self.export is not None
        if self.closing:
            return
        if req.cmd == Cmd.DISC:
            self.closing = True
            for later in self._backlog:  # nothing may follow DISC
                self._give_back(later)
            self._backlog.clear()
            self._update_reading()
            self._maybe_close()
            return
        self.requests += 1
        req.started = time.monotonic_ns()
        err = Errno.EINVAL if req.oversized else validate(req, self.neg)
        if err:
            self.shared.stats.request(req.cmd, err, time.monotonic_ns() - req.started)
            self.log.debug(
                "request refused", cmd=req.cmd, offset=req.offset, length=req.length,
                error=err.name,
            )
            self._send([error_reply(req, self.neg, err)])
            self._give_back(req)
            return
        if req.cmd == Cmd.READ:
            req.buffer = self.shared.buffers.get_at_least(req.length)
            self.shared.budget.charge(len(req.buffer))
        self.inflight += 1
        self.inflight_bytes += _cost(req)
        self.shared.dispatcher.submit(self, self.export.device, req, self.neg)

    def complete(self, req: Request, result: Result) -> None:
        """On the loop: a request's device work is over; send its reply."""
        assert self.neg is not None
        self.last_active = time.monotonic()
        self.inflight -= 1
        self.inflight_bytes -= _cost(req)
        err, data = Errno.OK, 0
        if isinstance(result, OSError):
            err = errno_to_nbd(result.errno)
            self.failures += 1
            held_back = self.shared.throttle.admit((req.cmd, err))
            if held_back is not None:
                self.log.warning(
                    "request failed", cmd=cmd_name(req.cmd), offset=req.offset,
                    length=req.length, error=err.name, reason=result.strerror,
                    held_back=held_back,
                )
            frames: Frames = [error_reply(req, self.neg, err, result.strerror or "")]
        elif isinstance(result, BaseException):
            self.log.error(
                "request crashed", cmd=cmd_name(req.cmd), offset=req.offset,
                error=type(result).__name__,
            )
            err = Errno.EIO
            frames = [error_reply(req, self.neg, err, "internal error")]
        else:
            frames = result
            if req.cmd == Cmd.READ:
                self.bytes_read += (data := req.length)
            elif req.cmd == Cmd.WRITE:
                self.bytes_written += (data := req.length)
        self.shared.stats.request(req.cmd, err, time.monotonic_ns() - req.started, data)
        self._send(frames)
        del frames, result
        self._give_back(req)
        if self.closed.is_set():
            self._release_unsent()
        self._pump()
        self._maybe_close()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        # Decoded requests that wait in the backlog are bounded by one
        # read's worth of bytes: stop reading until they have started. With
        # the budget spent, stop too, unless a WRITE's data is half in (it
        # is paid for, and must arrive for anything to move).
        budget = self.shared.budget
        pause = (self.closing or self._gated() or bool(self._backlog)
                 or (budget.full and not self.decoder.mid_write))
        if pause and budget.full:
            budget.wait(self._wake)
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                t.pause_reading()
            else:
                t.resume_reading()

    def _maybe_close(self) -> None:
        if self._pumping:
            return  # the pump decides once its loop is over
        if self.closing and self.inflight == 0 and self.transport is not None:
            self.end_batch()
            self.transport.close()

    def stop(self) -> None:
        """Server shutdown: take no new requests, close once in flight ones end."""
        self.closing = True
        if self.neg is None:
            if self.transport is not None:
                self.transport.close()
            return
        self._update_reading()
        self._maybe_close()

