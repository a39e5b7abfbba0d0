"""The asyncio adapter: sockets in, sans-IO handshake and codec, device calls
on worker threads, replies out. Protocol decisions live in handshake.py,
wire.py and commands.py; this module only moves bytes and schedules work."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from ..block.base import BlockDevice
from .buffers import BufferPool
from .commands import (
    block_status_reply,
    errno_to_nbd,
    error_reply,
    read_reply_headers,
    validate,
)
from .constants import MAX_PAYLOAD, Cmd, CmdFlag, Errno, TxFlag
from .handshake import ExportInfo, Handshake, Negotiated, State, TlsMode
from .wire import ProtocolError, Request, RequestDecoder, encode_simple_reply

log = structlog.get_logger("nbdluks.server")

DEFAULT_MAX_INFLIGHT = 64 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 128
HANDSHAKE_TIMEOUT = 30.0
# What a request costs against the in-flight cap beyond its payload, so that
# a flood of tiny requests is bounded too.
_REQUEST_OVERHEAD = 4096
# When inline requests take this long on average (a moving average, so that
# one request the scheduler preempted does not count), inlining stops for
# _INLINE_BACKOFF s.
_INLINE_SLOW = 0.001
_INLINE_BACKOFF = 5.0
# Replies queued beyond this many bytes are written at once, so that the
# transport's flow control (pause_writing) still sees them in time.
_REPLY_BATCH = 1024 * 1024
# Plain ints: operators on IntFlag members cost ~0.8 us each (enum code).
_FUA, _DF = int(CmdFlag.FUA), int(CmdFlag.DF)
_NO_HOLE, _FAST_ZERO = int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO)


@dataclass
class Export:
    name: str
    device: BlockDevice
    description: str = ""
    read_only: bool = False

    def info(self) -> ExportInfo:
        dev = self.device
        caps = dev.caps
        flags = TxFlag.HAS_FLAGS
        writable = caps.writable and not self.read_only
        if not writable:
            flags |= TxFlag.READ_ONLY
        if caps.flush:
            flags |= TxFlag.SEND_FLUSH
        if writable:
            if caps.fua:
                flags |= TxFlag.SEND_FUA
            if caps.trim:
                flags |= TxFlag.SEND_TRIM
            if caps.zero:
                flags |= TxFlag.SEND_WRITE_ZEROES
                if caps.fast_zero:
                    flags |= TxFlag.SEND_FAST_ZERO
        if caps.multi_conn:
            flags |= TxFlag.CAN_MULTI_CONN
        if caps.cache:
            flags |= TxFlag.SEND_CACHE
        return ExportInfo(
            name=self.name,
            size=dev.size,
            flags=flags,
            description=self.description,
            min_block=dev.min_block,
            pref_block=dev.pref_block,
            max_block=min(dev.max_block or MAX_PAYLOAD, MAX_PAYLOAD),
        )


def execute(dev: BlockDevice, req: Request, neg: Negotiated) -> list[bytes | memoryview]:
    """Run one valid request against the device (on a worker thread) and
    return its reply frames."""
    cmd = req.cmd
    fua = bool(req.flags & _FUA)
    if cmd == Cmd.READ:
        extents = None
        if neg.structured and not req.flags & _DF:
            extents = dev.read_extents(req.offset, req.length)
        plan = read_reply_headers(req, neg, extents)
        # Every byte that is sent gets read into: a pooled buffer's old
        # contents never leave (devices fail a read they cannot fill).
        buf = memoryview(req.buffer if req.buffer is not None else bytearray(req.length))
        frames: list[bytes | memoryview] = []
        for header, start, n in plan:
            frames.append(header)
            if n:
                dev.pread_into(buf[start : start + n], req.offset + start)
                frames.append(buf[start : start + n])
        return frames
    if cmd == Cmd.WRITE:
        assert req.payload is not None
        dev.pwrite(req.payload, req.offset, fua=fua, owned=True)
    elif cmd == Cmd.FLUSH:
        dev.flush()
    elif cmd == Cmd.TRIM:
        dev.trim(req.offset, req.length, fua=fua)
    elif cmd == Cmd.WRITE_ZEROES:
        dev.write_zeroes(
            req.offset,
            req.length,
            fua=fua,
            may_trim=not req.flags & _NO_HOLE,
            fast=bool(req.flags & _FAST_ZERO),
        )
    elif cmd == Cmd.CACHE:
        dev.cache(req.offset, req.length)
    elif cmd == Cmd.BLOCK_STATUS:
        return [block_status_reply(req, dev.extents(req.offset, req.length))]
    return [encode_simple_reply(req.handle)]


class Connection(asyncio.Protocol):
    _ids = itertools.count(1)

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.loop = server.loop
        self.log = log.bind(conn=next(self._ids))
        self.transport: asyncio.Transport | None = None
        self.handshake = Handshake({n: e.info() for n, e in server.exports.items()},
                                   server.tls)
        self._tls_task: asyncio.Task[None] | None = None
        self.neg: Negotiated | None = None
        self.export: Export | None = None
        self.decoder = RequestDecoder(alloc=server.buffers.get)
        self.inflight_bytes = 0
        self.inflight = 0
        self._backlog: collections.deque[Request] = collections.deque()
        self._pumping = False
        # Replies wait here while a batch of requests is processed, then go
        # out in one writev: a syscall (and a wake-up of the client) per
        # reply was a third of the loop's time for 4 KiB reads.
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        self.requests = 0
        self.closing = False  # DISC seen or server draining: no new requests
        self._write_paused = False
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()

    # --- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = t = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or transport.get_extra_info("sockname")
        self.log = self.log.bind(peer=_peer_str(peer))
        if len(self.server.connections) >= self.server.max_connections:
            # Each connection may hold --max-inflight bytes: a flood of them
            # must not starve the clients already served.
            self.log.warning("connection refused: too many connections",
                             limit=self.server.max_connections)
            self.closed.set()
            t.abort()  # type: ignore[attr-defined]
            return
        self.log.info("connection opened")
        self.server.connections.add(self)
        t.write(self.handshake.data_to_send())  # type: ignore[attr-defined]
        self._timer = self.loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed.is_set():  # a failed TLS handshake reports it itself
            return
        if self._timer:
            self._timer.cancel()
        self.server.connections.discard(self)
        self.log.info(
            "connection closed", requests=self.requests, error=str(exc) if exc else None
        )
        self.closed.set()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
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
            self.log.info("negotiation ended", reason=hs.close_reason)
            self.transport.close()
        elif hs.state is State.TLS_START:
            # Not one more byte for the option parser: the next ones are TLS.
            self.transport.pause_reading()
            self._tls_task = self.loop.create_task(self._start_tls())
        elif hs.state is State.DONE:
            assert hs.result is not None
            if self._timer:
                self._timer.cancel()
            self.neg = hs.result
            self.export = self.server.exports[self.neg.export.name]
            self.log = self.log.bind(export=self.neg.export.name)
            self.log.info(
                "export negotiated",
                size=self.neg.export.size,
                structured=self.neg.structured,
                tls=hs.tls_active,
                flags=_flag_names(self.neg.flags),
                meta_contexts=sorted(self.neg.meta_contexts.values()),
            )
            if self.closing:
                self._maybe_close()
            elif hs.leftover:
                self._receive_requests(hs.leftover)

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.server.ssl_context is not None
        plain = self.transport
        try:
            tls = await self.loop.start_tls(
                plain, self, self.server.ssl_context, server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
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
                      client=_subject_cn(peer) if peer else None)
        self.handshake.tls_started()

    def _handshake_timeout(self) -> None:
        if self.neg is None and self.transport is not None:
            self.log.warning("negotiation timed out")
            self.transport.close()

    # --- transmission -----------------------------------------------------------

    def _receive_requests(self, data: bytes) -> None:
        try:
            reqs = self.decoder.feed(data)
        except ProtocolError as e:
            self.log.warning("protocol error, closing", error=str(e))
            self._abort()
            return
        self._backlog.extend(reqs)
        self._pump()

    def _gated(self) -> bool:
        """No new work while replies wait for the client or the cap is reached."""
        return self._write_paused or self.inflight_bytes >= self.server.max_inflight

    def _pump(self) -> None:
        """Start backlog requests while the gate is open; then decide on reading."""
        if self._pumping:  # finish() of an inline request, from inside the loop below
            return
        self._pumping = True
        try:
            while self._backlog and not self._gated():
                self._dispatch(self._backlog.popleft())
        finally:
            self._pumping = False
        if not self.server.batching:
            self.flush_replies()
        self._update_reading()
        self._maybe_close()

    def _send(self, frames: list[bytes | memoryview]) -> None:
        self._out += frames
        self._out_bytes += sum(len(f) for f in frames)
        if self._out_bytes >= _REPLY_BATCH or not (self._pumping or self.server.batching):
            self.flush_replies()

    def flush_replies(self) -> None:
        if not self._out:
            return
        out, self._out, self._out_bytes = self._out, [], 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def _dispatch(self, req: Request) -> None:
        assert self.neg is not None and self.transport is not None
        if self.closing:
            return
        self.requests += 1
        if req.cmd == Cmd.DISC:
            self.closing = True
            self._backlog.clear()  # nothing may follow DISC
            self._update_reading()
            self._maybe_close()
            return
        err = Errno.EINVAL if req.oversized else validate(req, self.neg)
        if err:
            self.log.debug(
                "request refused", cmd=req.cmd, offset=req.offset, length=req.length,
                error=err.name,
            )
            self._send([error_reply(req, self.neg, err)])
            return
        cost = _REQUEST_OVERHEAD + (req.length if req.cmd in (Cmd.READ, Cmd.WRITE) else 0)
        if req.cmd == Cmd.READ:
            req.buffer = self.server.buffers.get(req.length)
        self.inflight += 1
        self.inflight_bytes += cost
        assert self.export is not None
        dev = self.export.device
        if self.server.may_inline(dev, req):
            self.finish(req, cost, self.server.run_inline(dev, req, self.neg))
            return
        self.server.submit(self, req, cost)

    def finish(self, req: Request, cost: int, result: list[bytes | memoryview] | BaseException
               ) -> None:
        """On the loop: a request's device work is over; send its reply."""
        assert self.neg is not None
        self.inflight -= 1
        self.inflight_bytes -= cost
        if isinstance(result, OSError):
            err = errno_to_nbd(result.errno)
            self.log.warning(
                "request failed", cmd=_cmd_name(req.cmd), offset=req.offset,
                length=req.length, error=err.name, reason=result.strerror,
            )
            frames: list[bytes | memoryview] = [
                error_reply(req, self.neg, err, result.strerror or "")
            ]
        elif isinstance(result, BaseException):
            self.log.error(
                "request crashed", cmd=_cmd_name(req.cmd), offset=req.offset,
                error=type(result).__name__,
            )
            frames = [error_reply(req, self.neg, Errno.EIO, "internal error")]
        else:
            frames = result
        self._send(frames)
        del frames, result
        for buf in (req.buffer, req.payload):
            if buf is not None:
                self.server.buffers.put(buf)
        req.buffer = req.payload = None
        self._pump()
        self._maybe_close()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        # Decoded requests that wait in the backlog are bounded by one
        # read's worth of bytes: stop reading until they have started.
        pause = self.closing or self._gated() or bool(self._backlog)
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
            self.flush_replies()
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def drain(self) -> None:
        """Server shutdown: take no new requests, close once in flight ones end."""
        self.closing = True
        if self.neg is None:
            if self.transport is not None:
                self.transport.close()
            return
        self._update_reading()
        self._maybe_close()


def _cmd_name(cmd: int) -> str:
    return Cmd(cmd).name if cmd in Cmd._value2member_map_ else str(cmd)


def _flag_names(flags: TxFlag) -> str:
    return "|".join(f.name or "" for f in TxFlag if f in flags)


def _subject_cn(cert: dict[str, object]) -> str | None:
    """The common name of a certificate's subject, for the log."""
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _peer_str(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix"


class NbdServer:
    def __init__(
        self,
        exports: Iterable[Export],
        *,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        workers: int = 16,
        tls: TlsMode = TlsMode.OFF,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if tls is not TlsMode.OFF and ssl_context is None:
            raise ValueError("TLS needs an SSL context")
        self.tls = tls
        self.ssl_context = ssl_context
        self.exports = {e.name: e for e in exports}
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.buffers = BufferPool(max_inflight)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbd-io")
        self.connections: set[Connection] = set()
        self.listeners: list[asyncio.AbstractServer] = []
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Finished requests, handed from worker threads to the loop in
        # batches: one wake-up per batch, not one per request.
        self._done: collections.deque[
            tuple[Connection, Request, int, list[bytes | memoryview] | BaseException]
        ] = collections.deque()
        self._wakeup_lock = threading.Lock()
        self._wakeup_pending = False
        self._inline_off_until = 0.0
        self._inline_avg = 0.0
        self.batching = False

    def may_inline(self, dev: BlockDevice, req: Request) -> bool:
        """Small reads and plain writes that the device says are quick run on
        the loop: a hop to a worker thread costs more than they do."""
        return (
            req.length <= dev.inline_max
            and req.cmd in (Cmd.READ, Cmd.WRITE)
            and not req.flags & _FUA
            and self.loop.time() >= self._inline_off_until
        )

    def run_inline(self, dev: BlockDevice, req: Request, neg: Negotiated
                   ) -> list[bytes | memoryview] | BaseException:
        t = time.perf_counter()
        try:
            return execute(dev, req, neg)
        except Exception as e:
            return e
        finally:
            self._inline_avg += (time.perf_counter() - t - self._inline_avg) * 0.1
            if self._inline_avg > _INLINE_SLOW:
                # The storage is slow right now (cold cache, busy disk): stop
                # blocking the loop for a while.
                self._inline_off_until = self.loop.time() + _INLINE_BACKOFF
                self._inline_avg = 0.0

    def submit(self, conn: Connection, req: Request, cost: int) -> None:
        assert conn.export is not None and conn.neg is not None
        self.executor.submit(self._work, conn, req, cost, conn.export.device, conn.neg)

    def _work(self, conn: Connection, req: Request, cost: int, dev: BlockDevice,
              neg: Negotiated) -> None:
        result: list[bytes | memoryview] | BaseException
        try:
            result = execute(dev, req, neg)
        except BaseException as e:  # reported on the loop, never lost
            result = e
        self._done.append((conn, req, cost, result))
        with self._wakeup_lock:
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self.loop.call_soon_threadsafe(self._drain_done)

    def _drain_done(self) -> None:
        with self._wakeup_lock:
            self._wakeup_pending = False
        touched: set[Connection] = set()
        self.batching = True  # one writev per connection for the whole batch
        try:
            while self._done:
                conn, req, cost, result = self._done.popleft()
                conn.finish(req, cost, result)
                touched.add(conn)
        finally:
            self.batching = False
            for conn in touched:
                conn.flush_replies()

    async def serve_sockets(self, socks: list[socket.socket]) -> None:
        """Serve on listening sockets made by `bind` (possibly in a parent process)."""
        for sock in socks:
            if sock.family == socket.AF_UNIX:
                srv = await self.loop.create_unix_server(lambda: Connection(self), sock=sock)
            else:
                srv = await self.loop.create_server(lambda: Connection(self), sock=sock)
            self.listeners.append(srv)

    def serve_channel(self, chan: socket.socket) -> None:
        """Serve connections a parent process accepted and passes over `chan`."""
        chan.setblocking(False)

        def receive() -> None:
            try:
                msg, fds, _, _ = socket.recv_fds(chan, 16, 16)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:  # the parent is gone: stop
                self.loop.remove_reader(chan.fileno())
                self._stop.set()
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                self.loop.create_task(
                    self.loop.connect_accepted_socket(lambda: Connection(self), sock)
                )

        self.loop.add_reader(chan.fileno(), receive)

    async def serve_until_stopped(
        self, drain_timeout: float = 30.0, stop_requested: Callable[[], bool] | None = None
    ) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.add_signal_handler(sig, self._on_signal, sig)
        if stop_requested is not None and stop_requested():
            self._stop.set()  # a signal came before the handlers above
        await self._stop.wait()
        await self.shutdown(drain_timeout)

    def _on_signal(self, sig: int) -> None:
        log.info("signal received, draining", signal=signal.Signals(sig).name)
        self._stop.set()

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        for srv in self.listeners:
            srv.close()
        conns = list(self.connections)
        for conn in conns:
            conn.drain()
        if conns:
            waits = [asyncio.ensure_future(c.closed.wait()) for c in conns]
            _, pending = await asyncio.wait(waits, timeout=drain_timeout)
            for w in pending:
                w.cancel()
            for conn in conns:
                if conn.transport is not None and not conn.closed.is_set():
                    conn.transport.abort()
        for export in self.exports.values():
            if export.device.caps.flush:
                try:
                    await self.loop.run_in_executor(self.executor, export.device.flush)
                except OSError as e:
                    log.error("final flush failed", export=export.name, error=e.strerror)
        self.executor.shutdown(wait=True)
        log.info("server stopped")
