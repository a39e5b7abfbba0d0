"""The reencryption of a served volume, in a process of its own beside the
server's: forked once the volume is open (it shares the device's boundary
and zone lock with every worker forked later), stopped between two steps
when the server stops, and killed with the server (a crash, recovered at
the next start, never a half-done step taken for a whole one)."""

from __future__ import annotations

import ctypes
import os
import signal
import time

import structlog

from .. import signals
from ..unlock import OpenVolume
from .reencrypt import ReencryptOptions, run_beside
from .target import Target

log = structlog.get_logger("nbdluks")
_PR_SET_PDEATHSIG = 1
STOP_WAIT = 120.0  # seconds a step may take to end once asked


class Reencryptor:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    @classmethod
    def start(cls, volume: OpenVolume, target: Target, payload: str, opts: ReencryptOptions,
              rate: float | None) -> Reencryptor:
        dev = volume.template
        assert dev is not None
        parent = os.getpid()
        pid = os.fork()
        if pid:
            log.info("reencryption running beside the server", pid=pid,
                     rate_mib_s=rate and rate / 2**20)
            return cls(pid)
        status = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the server died before the line above
                os._exit(1)
            signals.defer()
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            status = run_beside(target, payload, dev, opts, rate)
        except BaseException as e:
            log.error("reencryption failed; the server serves on (a zone being rewritten "
                      "answers EIO until a restart recovers it)", error=str(e),
                      kind=type(e).__name__)
        finally:
            os._exit(status)

    def running(self) -> bool:
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return False
        return pid == 0

    def stop(self) -> None:
        """Ask it to stop after its step; wait (killed if it does not)."""
        if not self.running():
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        while self.running():
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            time.sleep(0.05)
