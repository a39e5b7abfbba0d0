"""Command-line errors: one line, the right exit status, nothing listening."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_listening


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdluks", "serve", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "nothing to serve"),
        # no key option: tokens would unlock; the header must be read first
        (("--payload", "/nonexistent"), 1, "No such file"),
        (("--raw", "/x", "--payload", "/y"), 2, "cannot be combined"),
        (("--raw", "/nonexistent/disk.img"), 1, "No such file"),
        (("--payload", "/nonexistent", "--key-file", "/dev/null"), 1, "No such file"),
        (("--raw", "nbd+unix:///?socket=/nonexistent.sock"), 1, "cannot connect"),
        (("--raw", "nbds://127.0.0.1:1/x?tls-verify-peer=maybe"), 2, "true or false"),
        # lower layers describe the problem, the CLI names the flag
        (("--raw", "/dev/null", "--tls", "on", "--tls-certificates", "/nonexistent"), 2,
         "server-cert.pem: no such file (see --tls-certificates)"),
    ],
)
def test_errors_are_one_line(args: tuple[str, ...], code: int, message: str) -> None:
    p = serve(*args)
    assert p.returncode == code, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (("-p", "70000"), "-p/--port 70000: must be 1..65535"),
    (("-p", "0"), "-p/--port 0: must be 1..65535"),
    (("--processes", "0"), "--processes 0: must be 1..256"),
    (("--processes", "-1"), "--processes -1"),
    (("--max-inflight", "0"), "--max-inflight 0"),
    (("--max-inflight", "-1"), "--max-inflight -1"),
    (("--threads", "0"), "--threads 0"),
    (("--busy-poll", "-1"), "--busy-poll -1: must be 0..1000"),
    (("--busy-poll", "5000"), "--busy-poll 5000: must be 0..1000"),
    (("--max-connections", "0"), "--max-connections 0"),
    (("--upstream-timeout", "0"), "--upstream-timeout must be more than 0"),
    (("--upstream-reconnect", "-1"), "--upstream-reconnect cannot be negative"),
    (("--key-slot", "32"), "--key-slot 32: must be 0..31"),
    (("--keyfile-offset", "-5"), "--keyfile-offset -5"),
    (("--argon2-max-memory", "0"), "--argon2-max-memory 0"),
    (("-k", "/tmp/" + "x" * 120), "at most 107 fit"),
    (("--metrics", "abc"), "--metrics abc: give [ADDR:]PORT with a port of 1..65535"),
    (("--metrics", "0"), "--metrics 0: give [ADDR:]PORT"),
    (("--metrics", "127.0.0.1:70000"), "--metrics 127.0.0.1:70000: give"),
    (("--metrics", "[::1]:"), "--metrics [::1]:: give"),
])
def test_wrong_flag_values_are_refused_before_the_unlock(tmp_path: Path, flags: tuple[str, ...],
                                                         message: str) -> None:
    # a passphrase file that blocks: the refusal must come before reading it
    fifo = tmp_path / "pass.fifo"
    os.mkfifo(fifo)
    p = serve("--payload", str(tmp_path / "x.img"), "--passphrase-file", str(fifo), *flags)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not any(tmp_path.glob("*.sock"))


@pytest.mark.parametrize(("uri", "message"), [
    ("nbd://[::1/", "Invalid IPv6 URL"),
    ("nbd+unix:///", "needs ?socket=PATH"),
    ("nbds://h/?tls-certificates=/nonexistent/pki", "/nonexistent/pki: no such directory"),
])
def test_malformed_sources_are_refused_before_the_unlock(tmp_path: Path, uri: str,
                                                         message: str) -> None:
    fifo = tmp_path / "pass.fifo"
    os.mkfifo(fifo)
    for args in (("--payload", uri), ("--payload", str(tmp_path / "p"), "--header", uri)):
        p = serve(*args, "--passphrase-file", str(fifo))
        assert p.returncode == 2 and message in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


def test_a_live_servers_socket_is_never_taken_over(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(sock))
        live.listen()
        p = serve("--raw", str(disk), "-k", str(sock))
        assert p.returncode == 2 and "a server is listening there" in p.stderr, p.stderr
        assert sock.exists()
    # the listener is gone: a stale file is replaced
    proc = subprocess.Popen([sys.executable, "-m", "nbdluks", "serve", "--raw", str(disk),
                             "-k", str(sock)], stderr=subprocess.PIPE)
    try:
        wait_listening(proc, str(sock), None, tmp_path / "none")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_port_in_use(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = serve("--raw", str(disk), "-p", str(port), "--log-format", "json")
    assert p.returncode == 2
    assert "cannot listen on 127.0.0.1:" in p.stderr and "Traceback" not in p.stderr


def test_metrics_port_in_use(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = serve("--raw", str(disk), "-k", str(tmp_path / "s.sock"), "--metrics", str(port))
    assert p.returncode == 2
    assert f"--metrics: cannot listen on 127.0.0.1:{port}" in p.stderr, p.stderr
    assert not (tmp_path / "s.sock").exists()  # the NBD listener was cleaned up


def test_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "nbdluks", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("nbdluks ")
    helptext = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--help"],
                              capture_output=True, text=True, check=True).stdout
    for opt in ("--payload", "--header", "--passphrase-file", "--key-file", "--volume-key-file",
                "--allow-discards", "--processes", "--max-memory", "--handshake-limit",
                "--stall-limit", "--print-uri", "--pid-file", "--log-format", "exit status", "nbd+unix://",
                "SIGHUP"):
        assert opt in helptext
