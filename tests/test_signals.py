"""Signals at any moment: a stop during the unlock or while workers are
spawned ends the server within seconds (also as PID 1, where a signal
without a handler is ignored); SIGHUP never kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import children, need, run, wait_listening
from tests.luks.reference import luks_format

MiB = 1 << 20


def start(args: list[str], log: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen([*prefix, sys.executable, "-m", "nbdluks", "serve", *args,
                                 "--log-format", "json", "--log-level", "debug"],
                                stdout=f, stderr=subprocess.STDOUT)


def started(proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the program runs its own code (its first log line): a
    signal before that meets the interpreter, not nbdluks."""
    deadline = time.monotonic() + 30
    while "process hardened" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    time.sleep(0.3)  # and on to the blocking open of the passphrase FIFO


def stopped_within(proc: subprocess.Popen[bytes], seconds: float) -> int:
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {seconds} s after the signal") from None


@pytest.fixture
def waiting_unlock(tmp_path: Path) -> tuple[list[str], Path]:
    """Arguments of a server that blocks in its unlock: its passphrase file is
    a FIFO nobody writes yet."""
    need("cryptsetup")
    made = luks_format(tmp_path, detached=True, size=MiB)
    assert made.header
    fifo = tmp_path / "pass.fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "s.sock"
    return ["--payload", str(made.payload), "--header", str(made.header),
            "--passphrase-file", str(fifo), "-k", str(sock)], fifo


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_the_unlock(tmp_path: Path, waiting_unlock: tuple[list[str], Path],
                                sig: signal.Signals) -> None:
    args, _ = waiting_unlock
    log = tmp_path / "log"
    proc = start(args, log)
    started(proc, log)  # then blocked opening the FIFO
    assert proc.poll() is None
    proc.send_signal(sig)
    assert stopped_within(proc, 10) == 0
    assert "stopped before serving" in log.read_text()
    assert not (tmp_path / "s.sock").exists()


def test_stop_during_the_unlock_as_pid_1(tmp_path: Path,
                                         waiting_unlock: tuple[list[str], Path]) -> None:
    need("unshare")
    if run(["unshare", "--pid", "--fork", "true"], check=False).returncode != 0:
        pytest.skip("no pid namespaces here")
    args, _ = waiting_unlock
    log = tmp_path / "log"
    outer = start(args, log, prefix=("unshare", "--pid", "--fork", "--kill-child"))
    try:
        deadline = time.monotonic() + 10
        inner = None
        while inner is None:  # the server: PID 1 of the new namespace
            assert time.monotonic() < deadline
            kids = children(outer.pid)
            inner = kids[0] if kids else None
            time.sleep(0.05)
        started(outer, log)
        status = Path(f"/proc/{inner}/status").read_text()
        assert status.split("NSpid:")[1].split("\n")[0].split()[-1] == "1"
        os.kill(inner, signal.SIGTERM)
        assert stopped_within(outer, 10) == 0
        assert "stopped before serving" in log.read_text()
    finally:
        if outer.poll() is None:
            outer.kill()  # --kill-child takes the server along
            outer.wait()


def test_sighup_during_startup_is_ignored(tmp_path: Path,
                                          waiting_unlock: tuple[list[str], Path]) -> None:
    need("qemu-img")
    args, fifo = waiting_unlock
    log = tmp_path / "log"
    proc = start(args, log)
    try:
        started(proc, log)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None
        passphrase = (tmp_path / "vol.pass").read_bytes()
        with open(fifo, "wb") as f:
            f.write(passphrase + b"\n")
        wait_listening(proc, str(tmp_path / "s.sock"), None, log)
        proc.send_signal(signal.SIGHUP)  # nothing to reload without TLS: keeps serving
        info = run(["qemu-img", "info", f"nbd+unix:///?socket={tmp_path / 's.sock'}"]).stdout
        assert "virtual size" in info
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert stopped_within(proc, 20) == 0
        text = log.read_text()
        assert "SIGHUP noted" in text and "nothing to reload" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stop_while_workers_are_spawned(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(MiB))
    sock = tmp_path / "s.sock"
    for attempt in range(5):  # the signal lands at a different moment each time
        log = tmp_path / f"log{attempt}"
        proc = start(["--raw", str(disk), "-k", str(sock), "--processes", "8"], log)
        wait_listening(proc, str(sock), None, log)  # the parent listens before it forks
        time.sleep(attempt * 0.03)
        proc.send_signal(signal.SIGTERM)
        assert stopped_within(proc, 15) == 0, log.read_text()
        assert not sock.exists()


SWALLOWED = r"""
import os, signal, time, weakref
from nbdluks import signals

signals.on_startup()

class Thing:
    pass

def callback(_ref):  # as the import system's module-lock callbacks run
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handler runs here: its Stopped cannot leave a callback

thing = Thing()
ref = weakref.ref(thing, callback)
del thing
print("still running, stop noted:", signals.requested() == signal.SIGTERM)
"""


def test_a_stop_python_swallows_is_still_seen() -> None:
    """A stop signal that lands in a weakref callback (where Python only
    prints exceptions) is noted, so the server stops when it starts, and
    prints no traceback. Such a stop once hung a server's startup."""
    p = subprocess.run([sys.executable, "-c", SWALLOWED], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert "stop noted: True" in p.stdout
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr
