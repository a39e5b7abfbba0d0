"""Running the server: one process, or several worker processes that accept
on the same listening sockets.

The crypto is CPU work that holds the GIL for much of its time; worker
processes are how one server uses every core. Each worker gets its own
device from the volume (BlockDevice.reopen); the parent keeps the volume's
template, with its key, only to start a replacement when a worker dies.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from .. import signals
from ..nbd import Export, NbdServer, ServerOptions, StatsTable
from ..unlock import OpenVolume
from . import readiness
from .metrics import Monitor, Observed, Responder
from .supervisor import Supervisor

log = structlog.get_logger("nbdluks")

@dataclass(frozen=True)
class ServeOptions:
    """How the server serves: its limits (for the whole server), by how many
    processes."""

    server: ServerOptions = field(default_factory=ServerOptions)
    processes: int = 1


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


async def _serve(export: Export, opts: ServeOptions, socks: list[socket.socket],
                 handoff: socket.socket | None, obs: Observed, index: int) -> int:
    server = NbdServer([export], opts.server, stats=obs.table.slot(index),
                       processes=max(1, opts.processes))
    web = None if obs.monitor is None else Responder(obs.monitor, lambda: not server.stopping)
    http: list[asyncio.Server] = []
    if handoff is not None:
        others = {} if web is None else {b"m": lambda sock: server.loop.create_task(
            web.answer_accepted(sock))}
        server.serve_handoff(handoff, others)
    else:
        await server.serve_sockets(socks)
        if web is not None:
            http = [await web.listen(sock) for sock in obs.http]
    # The main process tells systemd; workers have a parent that does.
    on_stop = None if handoff is not None else lambda: readiness.notify("STOPPING=1")
    status = await server.serve_until_stopped(stop_requested=signals.stop_requested,
                                              reload_requested=signals.reload_requested,
                                              on_stop=on_stop)
    for srv in http:
        srv.close()
    return status


def run_worker(volume: OpenVolume, opts: ServeOptions, socks: list[socket.socket],
               obs: Observed, index: int = 0, handoff: socket.socket | None = None) -> int:
    """Serve on listening sockets, or on connections handed over `handoff`."""
    signals.defer()
    device = volume.device()
    device.watch(obs.table.slot(index).upstream)
    export = Export(volume.name, device, volume.config.description)
    with device:
        return run_loop(_serve(export, opts, socks, handoff, obs, index))


def serve(volume: OpenVolume, socks: list[socket.socket], opts: ServeOptions,
          http: list[socket.socket] | None = None) -> int:
    table = StatsTable(max(1, opts.processes))
    monitor_ = (Monitor(table, volume.unlock_seconds, volume.watched_upstream)
                if http else None)
    obs = Observed(table, monitor_, http or [])
    if opts.processes <= 1:
        return run_worker(volume, opts, socks, obs)
    volume.before_fork()
    return Supervisor(volume, socks, opts, obs, run_worker).run()
