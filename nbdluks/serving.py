"""Running the server: one process, or several worker processes that accept
on the same listening sockets.

The crypto is CPU work that holds the GIL for much of its time; worker
processes are how one server uses every core. Each worker opens its own
payload and builds its own LuksDevice from the unlocked key; partial-sector
writes are serialized across workers by one shared lock. The parent keeps
the key only to start a replacement when a worker dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from .block.base import BlockDevice
from .nbd.server import Export, NbdServer

log = structlog.get_logger("nbdluks")

# A worker that dies this soon after starting, this many times, stops the server.
_QUICK_DEATH = 5.0
_MAX_QUICK_DEATHS = 3
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@dataclass
class ServeConfig:
    export_name: str = ""
    description: str = ""
    read_only: bool = False
    max_inflight: int = 64 * 1024 * 1024
    threads: int = 8
    processes: int = 1


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)


# Set by a signal that reaches a worker before its event loop handles signals.
_early_stop = False


def _note_early_stop(_sig: int, _frame: object) -> None:
    global _early_stop
    _early_stop = True


async def _serve(device: BlockDevice, socks: list[socket.socket], cfg: ServeConfig) -> int:
    export = Export(cfg.export_name, device, cfg.description, cfg.read_only)
    server = NbdServer([export], max_inflight=cfg.max_inflight, workers=cfg.threads)
    await server.serve_sockets(socks)
    await server.serve_until_stopped(stop_requested=lambda: _early_stop)
    return 0


def run_worker(make_device: Callable[[], BlockDevice], socks: list[socket.socket],
               cfg: ServeConfig) -> int:
    device = make_device()
    with device:
        return run_loop(_serve(device, socks, cfg))


def serve(make_device: Callable[[], BlockDevice], socks: list[socket.socket],
          cfg: ServeConfig) -> int:
    if cfg.processes <= 1:
        return run_worker(make_device, socks, cfg)
    return _supervise(make_device, socks, cfg)


def _supervise(make_device: Callable[[], BlockDevice], socks: list[socket.socket],
               cfg: ServeConfig) -> int:
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)
    stopping = False
    failed = False
    quick_deaths = 0

    def spawn(index: int) -> None:
        # Signals wait until the child has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGTERM, _note_early_stop)
                signal.signal(signal.SIGINT, _note_early_stop)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                structlog.contextvars.bind_contextvars(worker=index)
                code = run_worker(make_device, socks, cfg)
            except BaseException as e:
                log.error("worker failed", error=str(e), kind=type(e).__name__)
            finally:
                os._exit(code)
        children[pid] = (index, time.monotonic())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def on_signal(sig: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("signal received, stopping workers", signal=signal.Signals(sig).name)
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for i in range(cfg.processes):
        spawn(i)
    log.info("workers started", processes=cfg.processes)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            failed |= code != 0
            continue
        log.error("worker exited unexpectedly", worker=index, code=code)
        if time.monotonic() - started < _QUICK_DEATH:
            quick_deaths += 1
        if quick_deaths >= _MAX_QUICK_DEATHS:
            log.error("workers keep dying; stopping the server")
            failed = True
            on_signal(signal.SIGTERM, None)
            continue
        spawn(index)
    return 1 if failed else 0
