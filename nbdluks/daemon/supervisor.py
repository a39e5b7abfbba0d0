"""The parent of the worker processes.

It accepts connections and hands them round-robin to the workers (over a
socketpair each, with SCM_RIGHTS) so that a client's connections spread
evenly, replaces a worker that dies, and forwards SIGTERM/SIGINT and SIGHUP.

It also unlocks: the volumes of a configuration file are unlocked while
the workers already serve, each handed to every worker as soon as it is
ready (handover.py); clients asking for one still unlocking wait for it.
SIGHUP re-reads the file (reload.py): removed exports are taken from the
workers at once, added and changed ones handed over as they unlock (a
changed one replaces the one served when its new version is ready). The
workers stay: a reload starts no process.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import structlog

from .. import signals
from ..unlock import OpenVolume, VolumeConfig, open_volume, open_volumes
from . import readiness
from .cpus import usable_cpus
from .handover import send_change, send_volume
from .hardening import stop_with_parent
from .metrics import Observed
from .reload import Reread, diff

if TYPE_CHECKING:  # serving.py imports this module
    from .rotator import Rotator
    from .serving import ServeOptions

log = structlog.get_logger("nbdluks")

# A worker that dies this soon after starting, this many times, stops the server.
_QUICK_DEATH = 5.0
_MAX_QUICK_DEATHS = 3
_SIGNALS = {*signals.STOP, signal.SIGHUP}

# What a worker process runs: (volumes, options, listeners, observed, index, handoff) -> status
Worker = Callable[[Sequence[OpenVolume], "ServeOptions", list[socket.socket], Observed, int,
                   socket.socket], int]


@dataclass
class _Round:
    """Volumes being unlocked: at start, or for a reload."""

    reload: bool
    retired: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """The parent of the worker processes (see the module). `pending`:
    exports to unlock once the workers serve; `opened()`: called when they
    are (drops privileges); `child()`: in each worker after the fork."""

    def __init__(self, volumes: list[OpenVolume], socks: list[socket.socket],
                 opts: ServeOptions, obs: Observed, worker: Worker,
                 reread: Reread | None = None, pending: Sequence[VolumeConfig] = (),
                 opened: Callable[[], object] | None = None,
                 child: Callable[[], object] | None = None,
                 rotator: Rotator | None = None) -> None:
        self.rotator = rotator  # exports whose key is rotated while served
        self.volumes = {v.name: v for v in volumes}  # served (the templates, with keys)
        self.order = [*self.volumes, *(c.name for c in pending)]
        self.failed: set[str] = set()
        self.unlocking: set[str] = set()
        self.round: _Round | None = None
        self.results: queue.SimpleQueue[tuple[str, OpenVolume | Exception]] = \
            queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._wake_w.setblocking(False)
        self.worker = worker
        self.reread = reread
        self.pending = list(pending)
        self.opened = opened
        self.child = child
        self.reload_wanted = False
        self.socks = socks
        self.opts = opts
        self.obs = obs
        # index -> pid, handoff socket, start time
        self.workers: dict[int, tuple[int, socket.socket, float]] = {}
        self.stopping = False
        self.failed_exit = False
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
                for sock in [*self.socks, *self.obs.http, self._wake_r, self._wake_w]:
                    sock.close()
                for _, handoff, _ in self.workers.values():
                    handoff.close()
                parent_end.close()
                if self.child is not None:
                    self.child()
                code = self.worker(list(self.volumes.values()), self.opts, [], self.obs,
                                   index, child_end)
            except BaseException as e:
                log.error("worker failed", error=str(e), kind=type(e).__name__)
            finally:
                os._exit(code)
        child_end.close()
        self.workers[index] = (pid, parent_end, time.monotonic())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        if self.stopping:  # the stop came before the fork: this one was not told
            _tell(pid, signal.SIGTERM)
        # What it did not get with the fork: the exports still coming, and
        # those that failed (their clients are told so), in the file's order.
        change = {"order": self.order, "pending": sorted(self.unlocking - set(self.volumes)),
                  "failed": sorted(self.failed), **self._counts()}
        self._send(index, lambda handoff: send_change(handoff, change))

    def _counts(self) -> dict[str, int]:
        return {"served": len(self.volumes), "failed_count": len(self.failed)}

    def _send(self, index: int, send: Callable[[socket.socket], None]) -> None:
        with contextlib.suppress(OSError):  # it is gone: reap() will tell
            send(self.workers[index][1])

    def _broadcast(self, send: Callable[[socket.socket], None]) -> None:
        for index in list(self.workers):
            self._send(index, send)

    def on_signal(self, sig: int, _frame: object) -> None:
        if not self.stopping:
            log.info("signal received, stopping workers", signal=signal.Signals(sig).name)
            readiness.notify("STOPPING=1")
        self.stopping = True
        self._tell_workers(signal.SIGTERM)

    def on_hup(self, _sig: int, _frame: object) -> None:
        log.info("SIGHUP received, passing it to the workers")
        self._tell_workers(signal.SIGHUP)
        self.reload_wanted = self.reread is not None

    # --- unlocking ----------------------------------------------------------

    def unlock(self, configs: Sequence[VolumeConfig], round_: _Round) -> None:
        """Unlock `configs` on a daemon thread (a stop does not wait for it);
        each result reaches settle() on the main loop."""
        self.round = round_
        self.unlocking |= {c.name for c in configs}

        def done(name: str, got: OpenVolume | Exception) -> None:
            self.results.put((name, got))
            with contextlib.suppress(OSError):  # full: a wake-up is on its way
                self._wake_w.send(b"w")

        opener = open_volume if self.rotator is None else self.rotator.opener
        threading.Thread(target=open_volumes, args=(list(configs), usable_cpus()),
                         kwargs={"done": done, "opener": opener}, name="unlock",
                         daemon=True).start()
        if not configs:
            self._round_done()

    def settle_results(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self._wake_r.recv(4096, socket.MSG_DONTWAIT)
        while True:
            try:
                name, got = self.results.get_nowait()
            except queue.Empty:
                return
            self.settle(name, got)

    def settle(self, name: str, got: OpenVolume | Exception) -> None:
        """One export unlocked (handed to every worker) or failed."""
        if self.stopping or name not in self.unlocking or self.round is None:
            if isinstance(got, OpenVolume):
                got.close()
            return
        self.unlocking.discard(name)
        if isinstance(got, OpenVolume) and self.opts.processes > 1 and not got.multi_process:
            log.error("export not served", export=name, kind="MultiConnError",
                      error=f"its NBD source does not allow multi-conn, and "
                      f"{self.opts.processes} processes serve")
            got.close()
            got = RuntimeError("no multi-conn")
        old = self.volumes.pop(name, None)  # served until now (changed)
        if isinstance(got, OpenVolume):
            got.before_fork()
            self.volumes[name] = got
            self.failed.discard(name)
            self.round.added.append(name)
            self.obs.table.add_exports([name])
            meta = {"name": name, "row": self.obs.table.rows.get(name), **self._counts()}
            volume = got
            self._broadcast(lambda handoff: send_volume(handoff, volume, meta))
            if self.rotator is not None:
                self.rotator.start(volume)
        else:
            self.failed.add(name)
            self.round.failed.append(name)
            change = {"failed": [name], **self._counts()}
            self._broadcast(lambda handoff: send_change(handoff, change))
        if old is not None:
            old.close()  # the parent's template and key; each worker drains its own
        self._update_monitor()
        if not self.unlocking:
            self._round_done()

    def _update_monitor(self) -> None:
        if self.obs.monitor is not None:  # what workers started later report
            self.obs = replace(self.obs, monitor=replace(
                self.obs.monitor, exports=len(self.volumes), failed=len(self.failed)))

    def _round_done(self) -> None:
        r, self.round = self.round, None
        assert r is not None
        if r.reload:
            log.info("configuration reloaded", exports=len(self.volumes), added=r.added,
                     retired=r.retired, failed=sorted(r.failed))
            return
        if r.failed:
            log.error("exports not served", exports=sorted(r.failed), served=len(self.volumes))
        log.info("exports ready", exports=len(self.volumes), failed=len(r.failed),
                 seconds=round(time.monotonic() - r.started, 3))
        if self.opened is not None:
            self.opened()

    def reload(self) -> None:
        """Start a reload that was asked for, once no unlocking is under way
        (a SIGHUP during one is acted on after it)."""
        if not self.reload_wanted or self.round is not None or self.stopping:
            return
        self.reload_wanted = False
        assert self.reread is not None
        try:
            plan = diff(self.volumes, self.reread)
        except Exception as e:  # a bug, not a bad file: the served set stays
            log.error("configuration not reloaded", error=str(e), kind=type(e).__name__)
            return
        if plan is None:
            return
        if self.rotator is not None:  # between two steps, before anything changes
            for name in [*plan.removed, *plan.changed]:
                self.rotator.stop(name, self.volumes.get(name), served_on=name in plan.changed)
        for name in plan.removed:
            self.volumes.pop(name).close()
        self.order = plan.order
        self.failed &= set(plan.order)
        self._update_monitor()
        new = [c.name for c in plan.to_open if c.name not in self.volumes]
        change = {"remove": plan.removed, "pending": new, "order": plan.order,
                  **self._counts()}
        self._broadcast(lambda handoff: send_change(handoff, change))
        log.info("configuration reloading", removed=plan.removed, unlocking=len(plan.to_open))
        self.unlock(plan.to_open, _Round(True, retired=[*plan.removed, *plan.changed]))

    # --- connections and workers ----------------------------------------------

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
        order = sorted(self.workers)
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
            if self.stopping:
                self.failed_exit |= code != 0
                continue
            log.error("worker exited unexpectedly", worker=index, code=code)
            if time.monotonic() - started < _QUICK_DEATH:
                self.quick_deaths += 1
            if self.quick_deaths >= _MAX_QUICK_DEATHS:
                log.error("workers keep dying; stopping the server")
                self.failed_exit = True
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
        self.unlocking = {c.name for c in self.pending}  # the workers wait for them
        for i in range(self.opts.processes):
            if self.stopping:  # a stop during the spawning reaches the workers spawned
                break
            self.spawn(i)
        log.info("workers started", processes=self.opts.processes)
        if self.pending and not self.stopping:
            self.unlock(self.pending, _Round(False))
        try:
            return self._loop()
        finally:
            self.stopping = True
            if self.rotator is not None:
                self.rotator.close()
            for volume in self.volumes.values():
                volume.close()
            self.settle_results()  # closes those opened meanwhile
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self) -> int:
        sel = selectors.DefaultSelector()
        for sock in self.socks:
            sel.register(sock, selectors.EVENT_READ, b"c")
        for sock in self.obs.http:
            sel.register(sock, selectors.EVENT_READ, b"m")
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        while self.workers:
            if self.stopping and len(sel.get_map()) > 1:
                for sock in [*self.socks, *self.obs.http]:
                    sel.unregister(sock)
            for key, _ in sel.select(timeout=0.2):
                assert isinstance(key.fileobj, socket.socket)
                if key.data is not None:
                    self.accept(key.fileobj, key.data)
            self.settle_results()
            self.reap()
            self.reload()
        sel.close()
        return 1 if self.failed_exit else 0


def _tell(pid: int, sig: int) -> None:
    """Signal a worker that may have just died."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
