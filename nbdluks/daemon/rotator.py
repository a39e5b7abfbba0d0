"""The reencryptions of a server of many volumes (exports with
`reencrypt = true`), each in a process of its own.

The parent unlocks on threads while it serves, and a process forked from a
threaded parent may inherit a lock another thread held (a malloc arena,
the logging lock): it may hang. So the processes that reencrypt are forked
by a helper forked before any thread, once, at the start: the parent hands
it each rotating volume as it becomes ready, as it hands volumes to its
workers (handover.py: keys out of band, the boundary's shared cells and zone
lock beside), and the helper forks one process for it, which shares the
boundary with every worker. A reload that removes or changes such an export
stops its reencryption between two steps before anything else; a changed
version of the same volume shares the stopped one's boundary (its requests
still draining and the new steps exclude each other). The helper dies with
the server, and the reencrypting processes with the helper (SIGKILL: a
crash, recovered at the next start, never a half-done step).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from .. import signals
from ..unlock import MemoryGate, OpenVolume, VolumeConfig, open_volume
from .handover import VOLUME, load, read, send_volume

log = structlog.get_logger("nbdluks")

STOP = b"s"
STOP_WAIT = 120.0  # seconds a step may take to end once asked
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

# In the process forked for a volume: its reencryption; the exit status.
Run = Callable[[OpenVolume], int]
# On an unlocking thread: open an export that rotates (config, gate, the
# earlier version's (uuid, boundary) or None, whether this is its first opening).
Open = Callable[[VolumeConfig, MemoryGate | None, Any, bool], OpenVolume]


class Rotator:
    """The parent's end (see the module)."""

    def __init__(self, run: Run, open_rotating: Open) -> None:
        if threading.active_count() > 1:
            log.warning("the reencryption helper is forked from a threaded process",
                        threads=threading.active_count())
        self._open = open_rotating
        self.seen: set[str] = set()  # exports opened once (a later opening starts none)
        self.earlier: dict[str, Any] = {}  # export -> (uuid, boundary) of its rotation
        self.started: set[str] = set()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                _die_with(parent)
                code = _Helper(theirs, run).loop()
            except BaseException as e:
                log.error("reencryption helper failed", error=str(e), kind=type(e).__name__)
            finally:
                os._exit(code)
        theirs.close()
        self.pid, self.sock = pid, ours

    def opener(self, config: VolumeConfig, gate: MemoryGate | None) -> OpenVolume:
        """open_volumes' opener: an export that rotates is settled first."""
        if config.rotate is None or config.payload is None:
            return open_volume(config, gate)
        first = config.name not in self.seen
        self.seen.add(config.name)
        return self._open(config, gate, self.earlier.get(config.name), first)

    def start(self, volume: OpenVolume) -> None:
        """Its reencryption moved on beside the server (a volume that rotates)."""
        if volume.config.rotate is None or volume.boundary is None or volume.header is None:
            return
        self.earlier[volume.name] = (volume.header.uuid, volume.boundary)
        try:
            send_volume(self.sock, volume, {"name": volume.name})
        except OSError as e:
            log.error("reencryption not started", export=volume.name, error=str(e))
            return
        self.started.add(volume.name)

    def stop(self, name: str, served: OpenVolume | None, *, served_on: bool) -> None:
        """Its reencryption stopped between two steps; returns once it has.
        `served_on`: a new version replaces `served`, the one served now
        (whose reencryption lock the server holds, and boundary if it rotates)."""
        if not served_on:
            self.earlier.pop(name, None)
        elif served is not None and served.header is not None:
            self.earlier[name] = (served.header.uuid, served.boundary)
        if name not in self.started:
            return
        self.started.discard(name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            try:
                socket.send_fds(self.sock, [STOP], [theirs.fileno()])
                theirs.close()
                ours.sendall(json.dumps({"name": name}).encode())
                ours.shutdown(socket.SHUT_WR)
                ours.settimeout(STOP_WAIT + 10)
                ours.recv(1)
            except OSError as e:
                log.error("reencryption stop not confirmed", export=name, error=str(e))
                return
        log.info("reencryption stopped for the reload", export=name)

    def close(self) -> None:
        """Every reencryption stopped between two steps, the helper gone."""
        if self.sock.fileno() < 0:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        self.sock.close()
        _wait(self.pid, STOP_WAIT + 10)


class _Helper:
    def __init__(self, sock: socket.socket, run: Run) -> None:
        self.sock, self.run = sock, run
        self.children: dict[str, int] = {}

    def loop(self) -> int:
        signals.defer()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.sock.settimeout(0.5)
        while not signals.stop_requested():
            self._reap()
            try:
                msg, fds, _, _ = socket.recv_fds(self.sock, 1, 1)
            except (TimeoutError, InterruptedError):
                continue
            if not msg or not fds:
                break  # the server is gone
            with socket.socket(fileno=fds[0]) as conn:
                if msg == VOLUME:
                    self._start(conn)
                elif msg == STOP:
                    conn.settimeout(10)
                    self._stop(json.loads(conn.recv(4096))["name"])
                    conn.sendall(b"k")
        for name in list(self.children):
            self._stop(name)
        return 0

    def _start(self, conn: socket.socket) -> None:
        message = read(conn)
        name = str(message.meta["name"])
        self._stop(name)  # (one at a time per export)
        helper = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.sock.close()
                _die_with(helper)
                structlog.contextvars.bind_contextvars(export=name)
                # Rebuilt here, not in the helper: rebuilding may start a thread
                # (an NBD source connects), and the helper forks the next ones.
                _, got = load(message)
                if not isinstance(got, OpenVolume):
                    log.error("reencryption not started", error=str(got))
                    os._exit(1)
                code = self.run(got)
            except BaseException as e:
                log.error("reencryption failed; the export is served on (a zone being "
                          "rewritten answers EIO until a restart recovers it)",
                          error=str(e), kind=type(e).__name__)
            finally:
                os._exit(code)
        message.discard()  # this process's copy of the keys
        self.children[name] = pid

    def _stop(self, name: str) -> None:
        pid = self.children.pop(name, None)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            _wait(pid, STOP_WAIT)

    def _reap(self) -> None:
        for name, pid in list(self.children.items()):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
                log.info("reencryption process ended", export=name,
                         code=os.waitstatus_to_exitcode(status))
            del self.children[name]


def _die_with(parent: int) -> None:
    """Killed when `parent` dies, even by SIGKILL."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _wait(pid: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
