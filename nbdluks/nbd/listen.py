"""Listening sockets, made before the event loop (and before worker
processes fork, so that they all accept on the same sockets)."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass


@dataclass
class Listen:
    """A TCP address or a unix socket path."""

    host: str | None = None
    port: int | None = None
    socket_path: str | None = None
    mode: int | None = None  # of the socket file (None: from the umask)

    def __str__(self) -> str:
        if self.socket_path:
            return f"unix:{self.socket_path}"
        return f"{self.host}:{self.port}"


def bind(where: Listen, backlog: int = 128) -> list[socket.socket]:
    if where.socket_path:
        path = where.socket_path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                if _alive(path):  # never take over a live server's socket
                    raise OSError(errno.EADDRINUSE, "a server is listening there")
                os.unlink(path)  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            if where.mode is not None:
                os.chmod(path, where.mode)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        _paths[sock] = path
        return [sock]
    socks = []
    try:
        for family, kind, proto, _, addr in socket.getaddrinfo(
            where.host, where.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


# The first descriptor systemd passes (sd_listen_fds(3)).
_LISTEN_FDS_START = 3


def activated() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (LISTEN_PID,
    LISTEN_FDS), or [] when there are none. They are systemd's: cleanup()
    never removes their files."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    socks = []
    for fd in range(_LISTEN_FDS_START, _LISTEN_FDS_START + n):
        sock = socket.socket(fileno=fd)
        if (sock.type != socket.SOCK_STREAM
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            raise OSError(f"descriptor {fd} from systemd is not a listening stream socket")
        os.set_inheritable(fd, False)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def give(socks: list[socket.socket], uid: int, gid: int) -> None:
    """The unix socket files we created now belong to uid:gid (the user a
    server switches to: its clients connect as that user, and it removes
    the files at exit)."""
    for sock in socks:
        path = _paths.get(sock)
        if path:
            os.chown(path, uid, gid)


def cleanup(socks: list[socket.socket]) -> None:
    """Close listeners and remove the unix socket files we created."""
    for sock in socks:
        path = _paths.pop(sock, None)
        sock.close()  # a no-op when the event loop closed it already
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


# Unix socket paths by listener: a closed socket no longer knows its name.
_paths: dict[socket.socket, str] = {}
