"""The reencryption of a served volume, in a process of its own beside the
server's: forked once the volume is open (it shares the device's boundary
and zone lock with every worker forked later), stopped between two steps
when the server stops, and killed with the server (a crash, recovered at
the next start, never a half-done step taken for a whole one).

With a configuration file the process is forked by the server's rotator
(daemon), which calls `open_rotating` to open such an export and
`rotate_beside` in the process it forks for it."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from dataclasses import replace
from typing import Any

import structlog

from .. import signals
from ..unlock import MemoryGate, OpenVolume, VolumeConfig, open_volume, secret_once
from .reencrypt import ReencryptOptions, reencrypt, run_beside
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


def target_of(config: VolumeConfig) -> Target:
    assert config.payload is not None
    return Target((config.headers or (config.payload,))[0], config.options.upstream,
                  config.keys.argon2_max_kib)


def _options(config: VolumeConfig) -> ReencryptOptions:
    assert config.rotate is not None
    return ReencryptOptions(resilience=config.rotate.resilience,
                            hotzone_size=config.rotate.hotzone_size)


def open_rotating(config: VolumeConfig, gate: MemoryGate | None, earlier: Any,
                  first: bool) -> OpenVolume:
    """An export whose key is rotated while served: the reencryption
    started (`first`: the export's first opening by this server; later ones
    only go on with one in progress) or an interrupted step recovered, then
    opened. `earlier`: (uuid, boundary or None) of the version served now,
    whose reencryption lock the server holds and whose reencryption was
    stopped: the same volume shares that boundary, so that the requests it
    still drains and the new steps exclude each other."""
    assert config.payload is not None
    with secret_once(config.keys) as keys:
        progress = reencrypt(target_of(config), config.payload, keys, _options(config),
                             settle_only=True, may_start=first,
                             held=None if earlier is None else earlier[0])
        shared: dict[str, Any] = {}
        if not progress.finished and earlier is not None and earlier[0] == progress.uuid \
                and earlier[1] is not None:
            earlier[1].publish(progress.done)
            shared["boundary"] = earlier[1]
        volume = open_volume(replace(config, keys=keys, options=replace(
            config.options, reencrypting=True)), gate, **shared)
    volume.config = config  # what the file says (a reload compares it)
    return volume


def rotate_beside(volume: OpenVolume) -> int:
    """In the process forked for it: the export's reencryption moved on to
    its end (or a stop); the exit status."""
    config = volume.config
    assert config.rotate is not None and config.payload is not None
    dev = volume.template
    assert dev is not None
    log.info("reencryption running beside the server", export=config.name, pid=os.getpid(),
             rate_mib_s=config.rotate.rate and config.rotate.rate / 2**20)
    return run_beside(target_of(config), config.payload, dev, _options(config),
                      config.rotate.rate)
