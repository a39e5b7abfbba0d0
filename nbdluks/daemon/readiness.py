"""Telling the world the server is ready: the URIs it serves (printed as
nbdkit prints them), a pid file, and systemd's notification socket
(READY=1, STATUS=, STOPPING=1 on $NOTIFY_SOCKET, as sd_notify(3) sends)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import quote

from ..errors import NbdluksError


class PidFileError(NbdluksError):
    pass


def uris(socks: list[socket.socket], export: str, tls: bool) -> list[str]:
    """An NBD URI for each listener."""
    s = "s" if tls else ""
    name = quote(export)
    out = []
    for sock in socks:
        addr = sock.getsockname()
        if sock.family == socket.AF_UNIX:
            out.append(f"nbd{s}+unix:///{name}?socket={quote(str(addr))}")
        elif sock.family == socket.AF_INET6:
            out.append(f"nbd{s}://[{addr[0]}]:{addr[1]}/{name}")
        else:
            out.append(f"nbd{s}://{addr[0]}:{addr[1]}/{name}")
    return out


def write_pid_file(path: str) -> None:
    """Written whole or not at all (a reader never sees half a pid)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        Path(tmp).write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PidFileError(f"cannot write the pid file {path}: {e.strerror}") from None


def remove_pid_file(path: str) -> None:
    with contextlib.suppress(OSError):
        if Path(path).read_text().strip() == str(os.getpid()):
            os.unlink(path)


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1") to systemd when it listens; whether sent."""
    where = os.environ.get("NOTIFY_SOCKET")
    if not where:
        return False
    if where.startswith("@"):  # an abstract socket
        where = "\0" + where[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(fields).encode(), where)
        except OSError:
            return False
    return True
