"""Listeners: systemd socket activation (LISTEN_PID/LISTEN_FDS)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import need, pattern, run

MiB = 1 << 20


def activated_server(sock: socket.socket, *args: str) -> subprocess.Popen[str]:
    """Start nbdluks as systemd would: the listener as fd 3, LISTEN_PID its pid."""
    fd = sock.fileno()
    cmd = (f'exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -m nbdluks serve "$@" '
           "--log-format json")
    return subprocess.Popen(["bash", "-c", cmd, sys.executable, *args], pass_fds=(fd,),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_socket_activation_serves_on_the_passed_socket(tmp_path: Path) -> None:
    need("nbdcopy")
    disk = tmp_path / "disk.img"
    data = pattern(2 * MiB, seed=9)
    disk.write_bytes(data)
    path = tmp_path / "activated.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        proc = activated_server(listener, "--raw", str(disk))
    # the server owns the only copy of the listener now; clients may connect
    # before it is ready: the kernel queues them
    out = tmp_path / "out.img"
    run(["nbdcopy", f"nbd+unix:///?socket={path}", str(out)])
    assert out.read_bytes() == data
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, log
    assert f"unix:{path}" in log  # the "listening" line names it
    assert path.exists()  # systemd's socket file is left alone


def test_socket_activation_excludes_listen_options(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "a.sock"))
        listener.listen()
        proc = activated_server(listener, "--raw", str(disk), "-p", "10999")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "socket activation" in out


def test_a_passed_descriptor_that_is_not_a_listener_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    a, b = socket.socketpair()
    with a, b:
        proc = activated_server(a, "--raw", str(disk))
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "not a listening stream socket" in out
