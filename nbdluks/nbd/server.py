"""The asyncio adapter of one server process: listeners (or connections
handed over by a parent process), signals and shutdown. Protocol decisions
live in handshake.py, wire.py and commands.py; connection.py moves a
client's bytes, dispatch.py decides where device work runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping

import structlog

from .buffers import BufferPool, MemoryBudget
from .commands import Export
from .connection import Connection, Shared
from .dispatch import Dispatcher
from .exports import Exports
from .options import ServerOptions
from .poll import Poller
from .registry import Registry
from .stats import Stats, StatsTable
from .tls import TlsConfigError

log = structlog.get_logger("nbdluks.server")

# Seconds between flushes of a process's request counts to the shared table.
STATS_FLUSH = 0.5


class NbdServer:
    def __init__(self, exports: Iterable[Export], options: ServerOptions,
                 stats: Stats | None = None, processes: int = 1) -> None:
        """`options` hold the whole server's limits; with several processes
        (connections are handed to them in turn) each takes an equal share."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.options = options
        self.exports = Exports(exports)
        self.dispatcher = Dispatcher(loop, options.threads)
        memory = options.max_memory // processes
        self.registry: Registry[Connection] = Registry(-(-options.max_connections // processes))
        self.shared = Shared(loop, self.exports, options, BufferPool(memory // 2),
                             MemoryBudget(memory, self.registry.limit), self.dispatcher,
                             self.registry, stats=stats or StatsTable().slot(0),
                             poller=Poller(options.busy_poll_us))
        self.listeners: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        # Exports no longer served (removed, or replaced by a newer one of
        # the same name): their connections close once their requests are
        # answered; then they are flushed, and closed when `owned`.
        self._draining: list[Export] = []
        self._owned: set[int] = set()  # ids of devices added (not the caller's)
        self._tick()  # counts reach the shared table at least this often

    def _tick(self) -> None:
        self.shared.stats.flush()
        now = time.monotonic()
        for conn in list(self.registry.live):
            conn.check_stalled(now)
        if self._draining:
            self._drain_step()
        if not self._stop.is_set():
            self.loop.call_later(STATS_FLUSH, self._tick)

    def add_export(self, export: Export) -> None:
        """Serve `export` from now on (this server closes its device); one of
        the same name served until now drains."""
        self._owned.add(id(export.device))
        old = self.exports.add(export)
        if old is not None:
            self._drain(old)

    def remove_export(self, name: str, failed: bool = False) -> None:
        """No new connections to `name`; those open close once their requests
        in flight are answered. `failed`: it could not be unlocked (clients
        are told so)."""
        old = self.exports.fail(name) if failed else self.exports.remove(name)
        if old is not None:
            self._drain(old)

    def _drain(self, export: Export) -> None:
        log.info("export drains", export=export.name,
                 connections=sum(c.export is export for c in self.registry.live))
        self._draining.append(export)
        self._drain_step()

    def _drain_step(self) -> None:
        busy = set()
        for conn in list(self.registry.live):
            if conn.export is not None and any(conn.export is e for e in self._draining):
                busy.add(id(conn.export))
                if not conn.closing:
                    conn.stop()
        # An export whose clients are gone: what they wrote, flushed now.
        for export in [e for e in self._draining if id(e) not in busy]:
            self._draining.remove(export)
            self.loop.create_task(self._retire(export))

    async def _retire(self, export: Export) -> None:
        if export.device.caps.flush:
            await self._flush(export)
        if id(export.device) in self._owned:
            self._owned.discard(id(export.device))
            await self.dispatcher.call(export.device.close)

    async def _flush(self, export: Export, event: str = "flush failed") -> bool:
        try:
            await self.dispatcher.call(export.device.flush)
        except OSError as e:
            log.error(event, export=export.name, error=e.strerror)
            return False
        return True

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _connection(self) -> Connection:
        return Connection(self.shared)

    async def serve_sockets(self, socks: list[socket.socket]) -> None:
        """Serve on listening sockets made by `bind` (possibly in a parent process)."""
        for sock in socks:
            if sock.family == socket.AF_UNIX:
                srv = await self.loop.create_unix_server(self._connection, sock=sock)
            else:
                srv = await self.loop.create_server(self._connection, sock=sock)
            self.listeners.append(srv)

    def serve_handoff(self, handoff: socket.socket,
                      others: Mapping[bytes, Callable[[socket.socket], object]] | None = None,
                      ) -> None:
        """Serve connections a parent process accepted and passes over `handoff`:
        each comes with a tag byte, b"c" for NBD, else a key of `others`."""
        handoff.setblocking(False)
        others = others or {}

        def receive() -> None:
            try:
                msg, fds, _, _ = socket.recv_fds(handoff, 16, 16)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg and not fds:  # the parent is gone: stop
                self.loop.remove_reader(handoff.fileno())
                self._stop.set()
                return
            for fd in fds[len(msg):]:  # never sent so; not ours to keep
                os.close(fd)
            for tag, fd in zip(msg, fds, strict=False):
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                other = others.get(bytes([tag]))
                if other is not None:
                    other(sock)
                    continue
                self.loop.create_task(
                    self.loop.connect_accepted_socket(self._connection, sock)
                )

        self.loop.add_reader(handoff.fileno(), receive)

    async def serve_until_stopped(
        self, drain_timeout: float = 30.0, stop_requested: Callable[[], bool] | None = None,
        reload_requested: Callable[[], bool] | None = None,
        on_stop: Callable[[], object] | None = None,
    ) -> int:
        """Serve until SIGTERM/SIGINT, then drain; the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.add_signal_handler(sig, self._on_signal, sig)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        # Signals that came before the handlers above
        if stop_requested is not None and stop_requested():
            self._stop.set()
        if reload_requested is not None and reload_requested():
            self.reload()
        await self._stop.wait()
        if on_stop is not None:
            on_stop()
        return await self.shutdown(drain_timeout)

    def _on_signal(self, sig: int) -> None:
        log.info("signal received, draining", signal=signal.Signals(sig).name)
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: read the TLS certificates again (for new connections)."""
        creds = self.options.credentials
        if creds is None:
            log.info("SIGHUP: nothing to reload (TLS is off)")
            return
        try:
            creds.reload()
        except TlsConfigError as e:
            log.error("TLS certificates not reloaded, the old ones stay in use", error=str(e))
            return
        log.info("TLS certificates reloaded", directory=creds.cert_dir)

    async def shutdown(self, drain_timeout: float = 30.0) -> int:
        """Stop listening, drain the connections, flush; 1 if the flush failed."""
        status = 0
        for srv in self.listeners:
            srv.close()
        conns = list(self.registry.live)
        for conn in conns:
            conn.stop()
        if conns:
            waits = [asyncio.ensure_future(c.closed.wait()) for c in conns]
            _, pending = await asyncio.wait(waits, timeout=drain_timeout)
            for w in pending:
                w.cancel()
            for conn in conns:
                if conn.transport is not None and not conn.closed.is_set():
                    conn.transport.abort()
        for export in [*self.exports.values(), *self._draining]:
            if export.device.caps.flush and not await self._flush(export, "final flush failed"):
                status = 1
            if id(export.device) in self._owned:
                export.device.close()
        self.dispatcher.shutdown()
        self.shared.stats.flush()
        log.info("server stopped")
        return status
