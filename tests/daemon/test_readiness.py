"""Readiness as supervisors see it: the URIs printed once listening, a pid
file for the server's lifetime, and systemd's READY/STATUS/STOPPING on
$NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, need, run


@pytest.mark.parametrize("processes", ["1", "2"])
def test_uris_pid_file_and_notify(tmp_path: Path, processes: str) -> None:
    need("nbdinfo")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    sock, pid_file, notify = tmp_path / "s.sock", tmp_path / "nbdluks.pid", tmp_path / "notify"
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify))
        systemd.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdluks", "serve", "--raw", str(disk), "-x", "my disk",
             "-k", str(sock), "-p", str(port), "--print-uri", "--pid-file", str(pid_file),
             "--processes", processes, "--log-format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "NOTIFY_SOCKET": str(notify)})
        try:
            assert proc.stdout is not None
            uris = [proc.stdout.readline().strip() for _ in range(2)]
            assert uris[0] == f"nbd+unix:///my%20disk?socket={sock}"
            assert uris[1] == f"nbd://127.0.0.1:{port}/my%20disk"
            for uri in uris:  # printed only once usable
                assert run(["nbdinfo", "--size", uri]).stdout.strip() == "1048576"
            ready = systemd.recv(4096).decode().splitlines()
            assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready
            assert any(f.startswith("STATUS=serving export 'my disk'") for f in ready)
            assert pid_file.read_text() == f"{proc.pid}\n"
            proc.send_signal(signal.SIGTERM)
            assert systemd.recv(4096).decode() == "STOPPING=1"
            assert proc.wait(30) == 0
            assert not pid_file.exists()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_an_unwritable_pid_file_is_a_one_line_error(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--raw", str(disk),
                        "-k", str(tmp_path / "s.sock"), "--pid-file", "/nonexistent/x.pid",
                        "--log-format", "console"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == (
        "nbdluks: cannot write the pid file /nonexistent/x.pid: No such file or directory")
    assert not (tmp_path / "s.sock").exists()


def test_plaintext_beyond_loopback_is_warned_about(nbdluks, tmp_path: Path) -> None:
    from nbdluks.daemon.lifecycle import _loopback

    # decided per listener (bound, never listening: nothing leaves this host)
    with socket.socket() as wide, socket.socket() as local, \
            socket.socket(socket.AF_UNIX) as unix:
        wide.bind(("0.0.0.0", 0))
        local.bind(("127.0.0.1", 0))
        unix.bind(str(tmp_path / "u.sock"))
        assert not _loopback(wide) and _loopback(local) and _loopback(unix)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    srv = nbdluks("--raw", str(disk), tcp=True)  # loopback and a unix socket
    assert srv.stop() == 0
    assert "beyond this host" not in srv.log_text()
