"""The parent of the worker processes.

It accepts connections and hands them round-robin to the workers (over a
socketpair each, with SCM_RIGHTS) so that a client's connections spread
evenly, replaces a worker that dies, and forwards SIGTERM/SIGINT and SIGHUP.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from .. import signals
from . import readiness
from .cpus import usable_cpus
from .hardening import stop_with_parent
from .metrics import Observed
from .reload import Plan, Reread, prepare

if TYPE_CHECKING:  # serving.py imports this module
    from ..unlock import OpenVolume
    from .serving import ServeOptions

log = structlog.get_logger("nbdluks")

# A worker that dies this soon after starting, this many times, stops the server.
_QUICK_DEATH = 5.0
_MAX_QUICK_DEATHS = 3
_SIGNALS = {*signals.STOP, signal.SIGHUP}

# What a worker process runs: (volumes, options, listeners, observed, index, handoff) -> status
Worker = Callable[[Sequence["OpenVolume"], "ServeOptions", list[socket.socket], Observed, int,
                   socket.socket], int]
# Worker slots per process asked for, when a configuration can be reloaded:
# the workers of earlier configurations drain while the new ones serve.
_GENERATIONS = 4


class Supervisor:
    """The parent of the worker processes (see the module). With `reread`,
    SIGHUP reloads the configuration: new workers serve the next set of
    volumes, the old ones retire (reload.py)."""

    def __init__(self, volumes: list[OpenVolume], socks: list[socket.socket],
                 opts: ServeOptions, obs: Observed, worker: Worker,
                 reread: Reread | None = None) -> None:
        self.volumes = volumes
        self.worker = worker
        self.reread = reread
        self.retiring: set[int] = set()  # workers of an earlier configuration
        self.reload_wanted = False
        self.reloading: threading.Thread | None = None  # unlocking the next set
        self.plan: list[Plan | None] = []
        self.socks = socks
        self.opts = opts
        self.obs = obs
        # index -> pid, handoff socket, start time
        self.workers: dict[int, tuple[int, socket.socket, float]] = {}
        self.stopping = False
        self.failed = False
        self.quick_deaths = 0
        self.next = 0

    def spawn(self, index: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Signals wait until the child has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signals.defer()
                stop_with_parent(parent)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                structlog.contextvars.bind_contextvars(worker=index)
                for sock in [*self.socks, *self.obs.http]:
                    sock.close()
                for _, handoff, _ in self.workers.values():
                    handoff.close()
                parent_end.close()
                code = self.worker(self.volumes, self.opts, [], self.obs, index, child_end)
            except BaseException as e:
                log.error("worker failed", error=str(e), kind=type(e).__name__)
            finally:
                os._exit(code)
        child_end.close()
        self.workers[index] = (pid, parent_end, time.monotonic())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if self.stopping:  # the stop came before the fork: this one was not told
            _tell(pid, signal.SIGTERM)

    def on_signal(self, sig: int, _frame: object) -> None:
        if not self.stopping:
            log.info("signal received, stopping workers", signal=signal.Signals(sig).name)
            readiness.notify("STOPPING=1")
        self.stopping = True
        self._tell_workers(signal.SIGTERM)

    @staticmethod
    def slots(processes: int) -> int:
        """Worker slots (of the stats table) a reloadable server needs."""
        return max(1, processes) * _GENERATIONS

    def on_hup(self, _sig: int, _frame: object) -> None:
        log.info("SIGHUP received, passing it to the workers")
        self._tell_workers(signal.SIGHUP)
        self.reload_wanted = self.reread is not None

    def reload(self) -> None:
        """Start a reload that was asked for, or finish one that is ready
        (the unlocking runs on a daemon thread: connections keep being
        accepted, and a stop does not wait for it)."""
        if self.reload_wanted and self.reloading is None and not self.stopping:
            self.reload_wanted = False
            self.plan = []
            self.reloading = threading.Thread(target=self._prepare, args=(list(self.volumes),),
                                              name="reload", daemon=True)
            self.reloading.start()
        if self.reloading is not None and not self.reloading.is_alive():
            self.reloading = None
            plan = self.plan[0] if self.plan else None
            if plan is not None and not self.stopping:
                self.swap(plan)

    def _prepare(self, volumes: list[OpenVolume]) -> None:
        assert self.reread is not None
        try:
            self.plan.append(prepare(volumes, self.reread, usable_cpus(),
                                     max(1, self.opts.processes)))
        except Exception as e:  # a bug, not a bad file: the served set stays
            log.error("configuration not reloaded", error=str(e), kind=type(e).__name__)

    def swap(self, plan: Plan) -> None:
        """Serve the next set of volumes with new workers; retire the others."""
        n = max(1, self.opts.processes)
        free = [i for i in range(self.slots(n)) if i not in self.workers]
        if len(free) < n or self.stopping:
            log.error("configuration not reloaded", serving="the one in use",
                      error="workers of earlier configurations still drain their clients",
                      draining=len(self.retiring))
            for volume in plan.volumes:
                if volume not in self.volumes:
                    volume.close()
            return
        for index in [i for i in self.workers if i not in self.retiring]:
            self._retire(index, plan.retired)
        for volume in self.volumes:
            if volume not in plan.volumes:
                volume.close()  # the parent's template and key; old workers have their own
        self.volumes = plan.volumes
        uncounted = self.obs.table.add_exports([v.name for v in plan.volumes])
        if uncounted:
            log.warning("exports counted in the totals only (the table of exports is full)",
                        exports=uncounted)
        if self.obs.monitor is not None:  # what the new workers report
            self.obs = replace(self.obs, monitor=replace(
                self.obs.monitor, exports=len(plan.volumes), failed=len(plan.failed)))
        for index in free[:n]:
            self.spawn(index)
        log.info("configuration reloaded", exports=len(plan.volumes), added=plan.added,
                 retired=plan.retired, failed=plan.failed)

    def _retire(self, index: int, names: list[str]) -> None:
        """Tell a worker to retire (the export names over a socket of its own)."""
        self.retiring.add(index)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            ours.sendall(json.dumps(names).encode())
            ours.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):  # it is gone: reap() will tell
                socket.send_fds(self.workers[index][1], [b"r"], [theirs.fileno()])

    def _tell_workers(self, sig: int) -> None:
        for pid, _, _ in list(self.workers.values()):
            _tell(pid, sig)

    def accept(self, listener: socket.socket, tag: bytes) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed", error=e.strerror)
                return
            self.hand_over(conn, tag)

    def hand_over(self, conn: socket.socket, tag: bytes) -> None:
        order = sorted(i for i in self.workers if i not in self.retiring)
        for k in range(len(order)):
            index = order[(self.next + k) % len(order)]
            handoff = self.workers[index][1]
            try:
                socket.send_fds(handoff, [tag], [conn.fileno()])
            except OSError:
                continue  # that worker is going away; try the next
            self.next = (self.next + k + 1) % len(order)
            break
        conn.close()  # the worker has its own copy now

    def reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return
            if pid == 0:
                return
            index = next((i for i, w in self.workers.items() if w[0] == pid), None)
            if index is None:
                continue
            _, handoff, started = self.workers.pop(index)
            handoff.close()
            self.obs.table.process_gone(index)
            code = os.waitstatus_to_exitcode(status)
            if index in self.retiring:
                self.retiring.discard(index)
                log.info("worker of an earlier configuration retired", worker=index, code=code)
                continue
            if self.stopping:
                self.failed |= code != 0
                continue
            log.error("worker exited unexpectedly", worker=index, code=code)
            if time.monotonic() - started < _QUICK_DEATH:
                self.quick_deaths += 1
            if self.quick_deaths >= _MAX_QUICK_DEATHS:
                log.error("workers keep dying; stopping the server")
                self.failed = True
                self.on_signal(signal.SIGTERM, None)
                continue
            self.spawn(index)

    def run(self) -> int:
        for sig in signals.STOP:
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGHUP, self.on_hup)
        stop = signals.requested()
        if stop is not None:  # a stop that came before these handlers
            self.on_signal(stop, None)
        if signals.reload_requested():  # a reload asked for while starting
            self.reload_wanted = self.reread is not None
        for i in range(self.opts.processes):
            if self.stopping:  # a stop during the spawning reaches the workers spawned
                break
            self.spawn(i)
        log.info("workers started", processes=self.opts.processes)
        sel = selectors.DefaultSelector()
        for sock in self.socks:
            sel.register(sock, selectors.EVENT_READ, b"c")
        for sock in self.obs.http:
            sel.register(sock, selectors.EVENT_READ, b"m")
        while self.workers:
            if self.stopping and sel.get_map():
                for sock in [*self.socks, *self.obs.http]:
                    sel.unregister(sock)
            for key, _ in sel.select(timeout=0.2):
                assert isinstance(key.fileobj, socket.socket)
                self.accept(key.fileobj, key.data)
            self.reap()
            self.reload()
        sel.close()
        return 1 if self.failed else 0


def _tell(pid: int, sig: int) -> None:
    """Signal a worker that may have just died."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
