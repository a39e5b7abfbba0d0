"""The asyncio adapter of one server process: listeners (or connections
handed over by a parent process), signals and shutdown. Protocol decisions
live in handshake.py, wire.py and commands.py; connection.py moves a
client's bytes, dispatch.py decides where device work runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from .options import ServerOptions
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
        self.exports = {e.name: e for e in exports}
        self.dispatcher = Dispatcher(loop, options.threads)
        memory = options.max_memory // processes
        self.registry: Registry[Connection] = Registry(-(-options.max_connections // processes))
        self.shared = Shared(loop, self.exports, options, BufferPool(memory // 2),
                             MemoryBudget(memory, self.registry.limit), self.dispatcher,
                             self.registry,
                             stats=stats or StatsTable().slot(0))
        self.listeners: list[asyncio.AbstractServer] = []
        self._stop = asyncio.Event()
        # Retiring (a newer configuration is served by other processes): the
        # exports no longer served; connections to them are closed once their
        # requests are answered, and the process stops when none is left.
        self._retiring: set[str] | None = None
        self._flushed: set[str] = set()  # retired exports flushed already
        self._tick()  # counts reach the shared table at least this often

    def _tick(self) -> None:
        self.shared.stats.flush()
        now = time.monotonic()
        for conn in list(self.registry.live):
            conn.check_stalled(now)
        if self._retiring is not None:
            self._retire_step()
        if not self._stop.is_set():
            self.loop.call_later(STATS_FLUSH, self._tick)

    def retire(self, names: Iterable[str]) -> None:
        """Take no new connections; close those to `names` once their
        requests in flight are answered; stop once no connection is left."""
        self._retiring = set(names)
        for srv in self.listeners:
            srv.close()
        log.info("retiring", exports=sorted(self._retiring), connections=len(self.registry.live))
        self._retire_step()

    def retire_from(self, sock: socket.socket) -> None:
        """retire() with the export names a parent wrote to `sock` (JSON)."""
        try:
            sock.setblocking(True)
            sock.settimeout(5)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            names = json.loads(data)
        except (OSError, ValueError) as e:
            log.error("retire message unreadable: retiring every export", error=str(e))
            names = list(self.exports)
        finally:
            sock.close()
        self.retire(str(n) for n in names)

    def _retire_step(self) -> None:
        assert self._retiring is not None
        busy = set()
        for conn in list(self.registry.live):
            if conn.export is not None and conn.export.name in self._retiring:
                busy.add(conn.export.name)
                if not conn.closing:
                    conn.stop()
        # A retired export whose clients are gone: what they wrote, flushed now.
        for name in self._retiring - busy - self._flushed:
            self._flushed.add(name)
            export = self.exports.get(name)
            if export is not None and export.device.caps.flush:
                self.loop.create_task(self._flush(export))
        if not self.registry.live:
            self._stop.set()

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
        for export in self.exports.values():
            if export.device.caps.flush and not await self._flush(export, "final flush failed"):
                status = 1
        self.dispatcher.shutdown()
        self.shared.stats.flush()
        log.info("server stopped")
        return status
