"""One client connection: the asyncio protocol. It routes the client's bytes
to the phase the connection is in: negotiation (negotiation.py) until an
export is chosen, then transmission, here: decode requests, validate them,
pass them to the dispatcher, write the replies. What it may start and when
it stops reading, flow.py decides."""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from . import fastpath, stats
from .buffers import BufferPool, MemoryBudget
from .commands import Export, Frames, errno_to_nbd, error_reply, validate
from .constants import REQUEST_SIZE, Cmd, Errno, cmd_name, flag_names
from .dispatch import Dispatcher, Result
from .flow import Flow
from .handshake import Negotiated
from .negotiation import Negotiation
from .options import ServerOptions
from .poll import Poller
from .registry import Registry
from .stats import Stats, StatsTable
from .throttle import Throttle
from .tls import peer_str
from .wire import ProtocolError, Request, RequestDecoder

log = structlog.get_logger("nbdluks.server")

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
    poller: Poller = field(default_factory=lambda: Poller(0))
    stats: Stats = field(default_factory=lambda: StatsTable().slot(0))


class Connection(asyncio.Protocol):
    _ids = itertools.count(1)

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.log = log.bind(conn=next(self._ids))
        self.transport: asyncio.Transport | None = None
        self.negotiation = Negotiation(self, shared.loop, shared.exports, shared.options)
        self.neg: Negotiated | None = None
        self.export: Export | None = None
        self.stats_row = -1  # the export's counters (stats.Stats.row)
        self.flow = Flow(shared.options.max_inflight, shared.budget, shared.buffers, self._wake)
        self.decoder = RequestDecoder(alloc=shared.buffers.get)
        self.fast: fastpath.Reader | None = None  # runs of small READs in C
        self.direct = False
        self.poll = shared.poller.watch(-1)  # the next request awaited on the CPU
        self._backlog: collections.deque[Request] = collections.deque()
        # Bytes the fast path left while the gate was shut (the client not
        # taking its replies, the budget spent): taken up again, still
        # undecoded, when it opens; reading stays paused meanwhile.
        self._held: memoryview | None = None
        self._pumping = False
        # Replies wait here while a batch of requests is processed, then go
        # out in one writev: a syscall and a wake-up of the client per reply
        # cost more than the work of a small request.
        self._out: Frames = []
        self._out_bytes = 0
        self.requests = 0
        self.failures = 0  # requests answered with an error by the device
        self.bytes_read = self.bytes_written = 0
        self.closing = False  # DISC seen or server stopping: no new requests
        self.closed = asyncio.Event()
        self.opened = self.last_active = self.received_at = time.monotonic()

    # --- what the registry asks ------------------------------------------------

    @property
    def negotiating(self) -> bool:
        return self.neg is None

    @property
    def busy(self) -> bool:
        return self.flow.inflight > 0 or bool(self._backlog) or self._held is not None

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
        self.negotiation.start()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.is_set():  # a failed TLS handshake reports it itself
            return
        self.negotiation.cancel_timer()
        if self.fast is not None:
            self.fast.close()
            self.fast = None
        self.poll.close()  # its socket closed just before this call: nothing reused it yet
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
        self.flow.pause_writing()
        self._update_reading()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self._pump()

    def data_received(self, data: bytes) -> None:
        if self.neg is None:
            self.negotiation.receive(data)
            return
        self.poll.arrived(self.requests)
        self._receive_requests(data)
        while more := self._polled():
            self._receive_requests(more)

    def negotiated(self, result: Negotiated, leftover: bytes) -> None:
        """Negotiation is over: transmission starts with `leftover`."""
        self.neg = result
        self.export = self.shared.exports[result.export.name]
        self.stats_row = self.shared.stats.row(result.export.name)
        self.log = self.log.bind(export=result.export.name)
        sock = -1 if self.negotiation.tls_active else fastpath.socket_of(self.transport)
        self.fast = fastpath.reader(self.export.device, result, sock)
        self.direct = self.fast is not None and sock >= 0  # replies written by the fast path
        self.poll = self.shared.poller.watch(sock if self.direct else -1)
        self.log.debug(
            "export negotiated",
            size=result.export.size,
            structured=result.structured,
            tls=self.negotiation.tls_active,
            flags=flag_names(result.flags),
            meta_contexts=sorted(result.meta_contexts.values()),
            fast_path="direct" if self.direct else "buffered" if self.fast else "off",
        )
        if self.closing:
            self._maybe_close()
        elif leftover:
            self._receive_requests(leftover)

    # --- transmission -----------------------------------------------------------

    def _receive_requests(self, data: bytes | memoryview) -> None:
        self.last_active = self.received_at = time.monotonic()
        if self.fast is not None and self._fast_open():
            pos, shut = self._serve_fast(data)
            if pos == len(data):
                # Nothing waits to start: only what the replies hold of the
                # budget, or a client that stopped reading them, may pause us.
                if self.flow.holds_replies:
                    self._update_reading()
                return
            data = memoryview(data)[pos:]
            if shut:  # replies made the gate shut: the rest waits for it undecoded
                self._held = data
                self._wait_room()
                self._update_reading()
                return
        decoder = self.decoder
        try:
            reqs = decoder.feed(data)
        except ProtocolError as e:
            self.log.warning("protocol error, closing", error=str(e))
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            if decoder.data_in:
                self.flow.data_in(decoder.data_in)
                decoder.data_in = 0
        self._backlog.extend(reqs)
        self._pump()

    def _fast_open(self) -> bool:
        """Whether requests may be answered in C now: nothing decoded waits
        for its turn or to be sent, no request is half in."""
        return (not self._backlog and not self._out and self.decoder.idle and not self.closing
                and self.shared.dispatcher.inline_open())

    def _polled(self) -> bytes | None:
        """The client's next bytes, awaited on the CPU where that pays: the
        last ones were all answered, nothing runs on the process's threads."""
        t = self.transport
        if (not self.poll.wants(self.requests) or not self._fast_open() or t is None
                or self.flow.holds_replies or not t.is_reading() or self.shared.dispatcher.running):
            return None
        return self.poll.wait(self.shared.stats)

    def _wait_room(self) -> None:
        """Be woken when the budget has room (resume_writing wakes us for
        the other reason the gate shuts)."""
        if not self.flow.gated:
            self.shared.budget.wait(self._wake)

    def _fast_room(self) -> bool:
        """The gate is open for a run of the fast path's replies."""
        return not self.flow.gated and self.shared.budget.allows(self.flow, fastpath.LIMIT)

    def _serve_fast(self, data: bytes | memoryview) -> tuple[int, bool]:
        """Answer the run of small READs that `data` starts with, in C;
        where the rest starts, and whether the gate shut after some were
        answered (else the request there is not one the fast path takes, or
        the gate was shut from the start: the general path decides, as ever)."""
        fast, flow, shared, t = self.fast, self.flow, self.shared, self.transport
        assert fast is not None and t is not None
        pos, end = 0, len(data) - REQUEST_SIZE
        # Replies written may pause the transport (the client does not read
        # them): the gate is asked again before each run.
        while pos <= end:
            if not self._fast_room():
                return pos, pos > 0
            start = time.perf_counter_ns()
            if t.get_write_buffer_size() == 0 and self.direct:
                try:
                    pos, out, n, nbytes = fast.send(data, pos, fastpath.LIMIT)
                except OSError:  # the client went away mid-reply
                    t.abort()
                    return len(data), False
            else:
                pos, out, n, nbytes = fast.serve(data, pos, fastpath.LIMIT)
            if not n:
                break
            ns = time.perf_counter_ns() - start
            shared.dispatcher.ran_inline(ns / n * 1e-9)
            self.requests += n
            self.bytes_read += nbytes
            shared.stats.reads(n, ns, nbytes, self.stats_row)
            if out is not None:
                t.write(out)
                if t.get_write_buffer_size():
                    flow.replies_out(len(out))  # charged until the transport has sent them
        return pos, False

    def _wake(self) -> None:
        self.shared.loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Start backlog requests while the gate is open; then decide on reading."""
        if self._pumping:  # complete() of an inline request, from inside the loop below
            return
        held = self._held
        if held is not None and not self.closing:
            if self._fast_room():
                self._held = None
                self._receive_requests(held)
                self._update_reading()  # it paused for what was held
                return
            self._wait_room()
        self._pumping = True
        try:
            while self._backlog and self.flow.may_start(self._backlog[0]):
                self._start(self._backlog.popleft())
        finally:
            self._pumping = False
        if not self.shared.dispatcher.batching:
            self.end_batch()
        self._update_reading()
        self._maybe_close()

    def _start(self, req: Request) -> None:
        assert self.neg is not None and self.export is not None
        if self.closing:
            return
        if req.cmd == Cmd.DISC:
            self.closing = True
            self._drop_backlog()  # nothing may follow DISC
            self._update_reading()
            self._maybe_close()
            return
        self.requests += 1
        req.started = time.monotonic_ns()
        err = Errno.EINVAL if req.oversized else validate(req, self.neg)
        if err:
            self.shared.stats.request(req.cmd, err, time.monotonic_ns() - req.started,
                                      row=self.stats_row)
            self.log.debug(
                "request refused", cmd=req.cmd, offset=req.offset, length=req.length,
                error=err.name,
            )
            self._send([error_reply(req, self.neg, err)])
            self.flow.give_back(req)
            return
        self.flow.started(req)
        self.shared.dispatcher.submit(self, self.export.device, req, self.neg)

    def complete(self, req: Request, result: Result) -> None:
        """On the loop: a request's device work is over; send its reply."""
        self.last_active = time.monotonic()
        self.flow.finished(req)
        err, frames = self._outcome(req, result)
        data = 0
        if not isinstance(result, BaseException):
            if req.cmd == Cmd.READ:
                self.bytes_read += (data := req.length)
            elif req.cmd == Cmd.WRITE:
                self.bytes_written += (data := req.length)
        self.shared.stats.request(req.cmd, err, time.monotonic_ns() - req.started, data,
                                  self.stats_row)
        self._send(frames)
        del frames, result
        self.flow.give_back(req)
        if self.closed.is_set():
            self.flow.release_unsent()
        self._pump()
        self._maybe_close()

    def _outcome(self, req: Request, result: Result) -> tuple[Errno, Frames]:
        """The errno of a request's result, and its reply."""
        assert self.neg is not None
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
            return err, [error_reply(req, self.neg, err, result.strerror or "")]
        if isinstance(result, BaseException):
            self.log.error(
                "request crashed", cmd=cmd_name(req.cmd), offset=req.offset,
                error=type(result).__name__,
            )
            return Errno.EIO, [error_reply(req, self.neg, Errno.EIO, "internal error")]
        return Errno.OK, result

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
                self.flow.release_unsent()
        else:
            self.flow.release_unsent()

    def _update_reading(self) -> None:
        self.flow.update_reading(self.transport,
                                 hold=self.closing or bool(self._backlog) or self._held is not None,
                                 mid_write=self.decoder.mid_write)

    def _drop_backlog(self) -> None:
        self._held = None
        for req in self._backlog:
            self.flow.give_back(req)
        self._backlog.clear()

    def check_stalled(self, now: float) -> None:
        """Close this connection if it has waited on its client too long."""
        if self.neg is None or self.transport is None:
            return
        what = self.flow.stalled(now, self.shared.options.stall_timeout,
                                 self.decoder.mid_write, self.received_at)
        if what is not None:
            held_back = self.shared.throttle.admit(("stalled", what))
            if held_back is not None:
                self.log.warning("connection closed: the client stalled", stalled=what,
                                 limit=self.shared.options.stall_timeout, held_back=held_back)
            self.transport.abort()

    def _release_all(self) -> None:
        """The connection is gone: nothing it holds will be sent."""
        self._drop_backlog()
        self.flow.drop_partial(self.decoder.abandon())
        self.flow.release_unsent()

    def _maybe_close(self) -> None:
        # While the pump runs, it decides once its loop is over.
        if (self.closing and not self._pumping and self.flow.inflight == 0
                and self.transport is not None):
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
