"""Shared fixtures: run nbdluks as a real process, drive real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Debian's python3-libnbd is built for Debian's own interpreter only.
SYSTEM_PYTHON = "/usr/bin/python3"


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def need(*tools: str) -> None:
    missing = [t for t in tools if not have(t)]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI is missing {missing}: the test setup must install them")
        pytest.skip(f"needs {missing}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    uri: str
    socket: str | None
    port: int | None
    log: Path

    @property
    def tcp_uri(self) -> str:
        assert self.port is not None
        return f"nbd://127.0.0.1:{self.port}/"

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("server did not stop on SIGTERM") from None
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text()


def wait_listening(proc: subprocess.Popen[bytes], sock: str | None, port: int | None,
                   log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if sock:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
            else:
                with socket.create_connection(("127.0.0.1", port or 0), timeout=1):
                    pass
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not start listening:\n{log.read_text()}")


def log_events(log: str, name: str) -> list[dict[str, Any]]:
    """The JSON log records of event `name`, in order."""
    out = []
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == name:
            out.append(rec)
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def wait_children(pid: int, n: int, timeout: float = 20) -> list[int]:
    """The worker processes of a server, once there are `n` (the parent
    listens before it forks them)."""
    deadline = time.monotonic() + timeout
    while len(kids := children(pid)) != n:
        assert time.monotonic() < deadline, f"{len(kids)} worker processes, not {n}"
        time.sleep(0.05)
    return kids


@pytest.fixture
def nbdluks(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start `nbdluks serve ARGS` on a unix socket (and a TCP port if tcp=True)."""
    started: list[Served] = []

    def start(*args: str, tcp: bool = False, unix: bool = True, stdin: bytes | None = None,
              export: str = "") -> Served:
        n = len(started)
        sock = str(tmp_path / f"nbdluks{n}.sock") if unix else None
        port = free_port() if tcp else None
        log = tmp_path / f"nbdluks{n}.log"
        cmd = [sys.executable, "-m", "nbdluks", "serve", *args, "--log-format", "json",
               "--log-level", "debug"]
        if sock:
            cmd += ["-k", sock]
        if port:
            cmd += ["-b", "127.0.0.1", "-p", str(port)]
        if export:
            cmd += ["-x", export]
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                cmd, stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            )
        if stdin is not None:
            assert proc.stdin is not None
            proc.stdin.write(stdin)
            proc.stdin.close()
        wait_listening(proc, sock, port, log)
        tcp_uri = f"nbd://127.0.0.1:{port}/{export}"
        uri = f"nbd+unix:///{export}?socket={sock}" if sock else tcp_uri
        served = Served(proc, uri, sock, port, log)
        started.append(served)
        return served

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def run(
    cmd: list[str], *, check: bool = True, input: str | None = None, timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"{cmd!r} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        )
    return p


def libnbd(script: str, uri: str, *, timeout: float = 120) -> str:
    """Run a python3-libnbd script with `h` connected to `uri`; return stdout."""
    need(SYSTEM_PYTHON)
    prelude = (
        "import nbd, sys, errno\n"
        "h = nbd.NBD()\n"
        "h.set_strict_mode(0)\n"
    )
    p = run([SYSTEM_PYTHON, "-c", prelude + script, uri], timeout=timeout)
    return p.stdout


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic pseudo-random bytes."""
    import numpy as np

    return np.random.default_rng(seed).bytes(size)


class Upstream:
    """nbdkit or qemu-nbd exporting a file, on a unix socket or TCP."""

    def __init__(self, kind: str, path: Path, tmp: Path, tcp: bool, read_only: bool = False):
        self.sock = None if tcp else str(tmp / f"{path.name}.{kind}.sock")
        self.port = free_port() if tcp else None
        if kind == "nbdkit":
            cmd = ["nbdkit", "-f", "--exit-with-parent"]
            cmd += ["-U", self.sock] if self.sock else ["-i", "127.0.0.1", "-p", str(self.port)]
            if read_only:
                cmd.append("--readonly")
            cmd += ["file", f"file={path}"]
        else:
            cmd = ["qemu-nbd", "-t", "-f", "raw", "--shared=8", "--cache=none"]
            cmd += ["-k", self.sock] if self.sock else ["-b", "127.0.0.1", "-p", str(self.port)]
            if read_only:
                cmd.append("-r")
            cmd.append(str(path))
        self.log = tmp / f"{path.name}.{kind}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        wait_listening(self.proc, self.sock, self.port, self.log)  # type: ignore[arg-type]

    @property
    def uri(self) -> str:
        if self.sock:
            return f"nbd+unix:///?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


@pytest.fixture
def tang(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Tang servers started by name (tests.unlock.test_tokens.Tang: tangd
    behind socat on loopback); all are stopped after the test."""
    from tests.unlock.test_tokens import TANGD, Tang

    need("clevis", "socat", TANGD)
    started: list[Tang] = []

    def start(name: str) -> Tang:
        started.append(Tang(tmp_path, name))
        return started[-1]

    yield start
    for t in started:
        t.stop()


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    """Upstream servers a test starts; killed at the end."""
    started: list[Upstream] = []
    yield started
    for u in started:
        if u.proc.poll() is None:
            u.proc.kill()
            u.proc.wait()

