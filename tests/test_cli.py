"""Command-line errors: one line, the right exit status, nothing listening."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdluks", "serve", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "nothing to serve"),
        (("--payload", "/nonexistent"), 2, "give one of --passphrase-file"),
        (("--raw", "/x", "--payload", "/y"), 2, "cannot be combined"),
        (("--raw", "/nonexistent/disk.img"), 1, "No such file"),
        (("--payload", "/nonexistent", "--key-file", "/dev/null"), 1, "No such file"),
        (("--raw", "nbd+unix:///?socket=/nonexistent.sock"), 1, "cannot connect"),
        (("--raw", "nbds://127.0.0.1:1/x?tls-verify-peer=maybe"), 1, "true or false"),
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


def test_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "nbdluks", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert out.startswith("nbdluks ")
    helptext = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--help"],
                              capture_output=True, text=True, check=True).stdout
    for opt in ("--payload", "--header", "--passphrase-file", "--key-file", "--volume-key-file",
                "--allow-discards", "--processes"):
        assert opt in helptext
