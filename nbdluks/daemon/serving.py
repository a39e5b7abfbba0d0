"""Running the server: one process, or several worker processes that accept
on the same listening sockets.

The crypto is CPU work that holds the GIL for much of its time; worker
processes are how one server uses every core. One set of processes serves
every volume: each worker gets its own device of each (BlockDevice.reopen
after the fork, or handed over while it runs: handover.py); the parent
keeps the volumes' templates, with their keys, to start a replacement when
a worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from .. import signals
from ..block import BlockDevice
from ..nbd import Export, NbdServer, ServerOptions, StatsTable
from ..unlock import OpenVolume, VolumeConfig
from . import readiness
from .handover import Receiver
from .hardening import locked_kib
from .metrics import Monitor, Observed, Responder
from .reload import Reread
from .rotator import Rotator
from .supervisor import Supervisor

log = structlog.get_logger("nbdluks")


# Exports a reloadable server counts requests of, at least (more when it
# starts with more): those added beyond it are counted in the totals only.
_EXPORT_ROWS = 256


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


async def _serve(exports: list[Export], opts: ServeOptions, socks: list[socket.socket],
                 handoff: socket.socket | None, obs: Observed, index: int) -> int:
    server = NbdServer(exports, opts.server, stats=obs.table.slot(index),
                       processes=max(1, opts.processes))
    web = None if obs.monitor is None else Responder(obs.monitor, lambda: not server.stopping)
    http: list[asyncio.Server] = []
    if handoff is not None:

        def counts(served: int, failed: int) -> None:
            if web is not None:
                web.monitor = replace(web.monitor, exports=served, failed=failed)

        others = Receiver(server, obs.table.rows, counts).handlers()
        if web is not None:
            others[b"m"] = lambda sock: server.loop.create_task(web.answer_accepted(sock))
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


def run_worker(volumes: Sequence[OpenVolume], opts: ServeOptions, socks: list[socket.socket],
               obs: Observed, index: int = 0, handoff: socket.socket | None = None) -> int:
    """Serve on listening sockets, or on connections handed over `handoff`."""
    signals.defer()
    with contextlib.ExitStack() as devices:
        exports = []
        for volume in volumes:
            device = devices.enter_context(volume.device())
            device.watch(obs.table.slot(index).upstream)
            exports.append(Export(volume.name, device, volume.config.description))
        _report_locks([e.device for e in exports])
        return run_loop(_serve(exports, opts, socks, handoff, obs, index))


def _report_locks(devices: Sequence[BlockDevice]) -> None:
    """One line per process that holds keys: whether they are locked in its
    memory, with what the kernel says is locked (mlock is not inherited)."""
    claims = [d.describe().get("key_locked_in_memory") for d in devices]
    keys = [c for c in claims if c is not None]
    if keys:
        kib = locked_kib()
        log.info("keys in memory", pid=os.getpid(), volumes=len(keys), locked_kib=kib,
                 key_locked_in_memory=all(keys) and kib > 0)


def serve(volumes: Sequence[OpenVolume], socks: list[socket.socket], opts: ServeOptions,
          http: list[socket.socket] | None = None, reread: Reread | None = None,
          failed: int = 0, pending: Sequence[VolumeConfig] = (),
          opened: Callable[[], object] | None = None,
          child: Callable[[], object] | None = None, rotator: Rotator | None = None) -> int:
    """Serve until stopped. `reread`: how SIGHUP gets the volumes anew (a
    configuration file); it needs worker processes, so it always has some.
    `failed`: exports configured but not opened (for metrics). `pending`:
    exports unlocked while the workers serve (`opened()` once they are;
    `child()` in each worker); `rotator`: their reencryptions."""
    if opts.processes > 1 and not all(v.multi_process for v in volumes):
        # One upstream connection per process: a FLUSH on one would not
        # cover another's writes unless the upstream promises multi-conn.
        log.info("one process: an NBD source does not allow multi-conn",
                 exports=[v.name for v in volumes if not v.multi_process])
        opts = replace(opts, processes=1)
    configured = len(volumes) + len(pending)
    table = StatsTable(max(1, opts.processes),
                       exports=max(_EXPORT_ROWS, 2 * configured) if reread else configured)
    table.add_exports([v.name for v in volumes])
    one = volumes[0] if len(volumes) == 1 else None
    monitor_ = None if not http else Monitor(
        table, one.unlock_seconds if one and not pending else None,
        one.watched_upstream if one and not pending else None,
        exports=len(volumes), failed=failed, rotation=one.rotation if one else None)
    obs = Observed(table, monitor_, http or [])
    if opts.processes <= 1 and reread is None:
        return run_worker(volumes, opts, socks, obs)
    for volume in volumes:
        volume.before_fork()
    return Supervisor(list(volumes), socks, opts, obs, run_worker, reread, pending, opened,
                      child, rotator).run()
