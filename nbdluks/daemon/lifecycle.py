"""A server's life once its volume is open: listen (or take the sockets
systemd passed), drop root, announce readiness, serve, and clean up.

The command line builds `DaemonOptions` and calls `run`; nothing here parses
arguments or names a flag: failures that the user's options caused are
`SetupError`s, which the command line reports with the flag to blame.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from ..errors import NbdluksError
from ..nbd import DEFAULT_PORT, Listen, TlsMode, activated, address, bind, cleanup, give
from ..unlock import OpenVolume, VolumeConfig
from . import readiness, serving
from .hardening import drop_privileges
from .reload import Reread
from .rotator import Rotator
from .serving import ServeOptions

log = structlog.get_logger("nbdluks")


class SetupError(NbdluksError):
    """Listening failed; `what` says where: "listen", "metrics",
    "activation", "activation-conflict" (activated sockets and addresses)."""

    def __init__(self, what: str, message: str) -> None:
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class DaemonOptions:
    serve: ServeOptions = field(default_factory=ServeOptions)
    # Where to listen; none: the sockets systemd passed, else the default.
    listen: Sequence[Listen] = ()
    metrics: Listen | None = None
    run_as: tuple[int, int] | None = None  # uid, gid once the sources are open
    print_uri: bool = False
    pid_file: str | None = None


# What serving starts from: the volumes opened, and how many configured
# exports could not be.
Opening = Callable[[], tuple[list[OpenVolume], int]]


def run(opening: Opening, opts: DaemonOptions, reread: Reread | None = None,
        pending: Sequence[VolumeConfig] = (), rotator: Rotator | None = None) -> int:
    """Listen, open the volumes (clients that connect meanwhile wait in the
    listen queue), drop root, serve until stopped; the volumes are closed on
    the way out. `reread`: how SIGHUP gets the volumes anew (a
    configuration file). `pending`: volumes unlocked while the workers
    already serve (they drop root at once, the parent once it has opened
    them). `rotator`: the reencryptions of those that rotate (closed here)."""
    socks: list[socket.socket] = []
    http: list[socket.socket] = []
    volumes: list[OpenVolume] = []
    run_as = opts.run_as

    def drop() -> None:
        if run_as is not None and drop_privileges(*run_as):
            log.info("running as", uid=os.getuid(), gid=os.getgid())

    try:
        socks = bind_listeners(opts.listen)
        http = bind_metrics(opts.metrics)
        volumes, failed = opening()
        if run_as is not None:
            give(socks, *run_as)  # its clients connect as that user
        if not pending:
            drop()
        announce([*(v.name for v in volumes), *(c.name for c in pending)], opts, socks, http)
        return serving.serve(volumes, socks, opts.serve, http, reread, failed, pending,
                             opened=drop if pending else None,
                             child=drop if pending else None, rotator=rotator)
    finally:
        if rotator is not None:
            rotator.close()
        for volume in volumes:
            volume.close()
        if opts.pid_file:
            readiness.remove_pid_file(opts.pid_file)
        cleanup(socks + http)


def bind_listeners(listen: Sequence[Listen]) -> list[socket.socket]:
    try:
        socks = activated()
    except OSError as e:
        raise SetupError("activation", f"socket activation: {e}") from None
    if socks:
        if listen:
            cleanup(socks)
            raise SetupError("activation-conflict", "socket activation (LISTEN_FDS) "
                             "excludes listening addresses of our own")
        return socks
    for where in listen or [Listen(host="127.0.0.1", port=DEFAULT_PORT)]:
        try:
            socks += bind(where)
        except OSError as e:
            cleanup(socks)
            raise SetupError("listen", f"cannot listen on {where}: {e.strerror}") from None
    return socks


def bind_metrics(where: Listen | None) -> list[socket.socket]:
    if where is None:
        return []
    try:
        return bind(where)
    except OSError as e:
        raise SetupError("metrics", f"cannot listen on {where}: {e.strerror}") from None


def _loopback(sock: socket.socket) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def announce(names: Sequence[str], opts: DaemonOptions, socks: list[socket.socket],
             http: list[socket.socket]) -> None:
    """Listening, with the key unlocked (or, for a configuration file, the
    keys being unlocked: a client waits for its export): say so, to people
    and to supervisors. (Connections made now wait in the listen queue until
    a worker takes them.)"""
    tls = opts.serve.server.tls
    log.info("listening", addresses=[address(s) for s in socks],
             **({"export": names[0]} if len(names) == 1 else {"exports": len(names)}),
             processes=opts.serve.processes, tls=tls.value,
             metrics=[f"http://{address(s)}/metrics" for s in http] or None)
    exposed = [address(s) for s in socks if not _loopback(s)]
    if exposed and tls is not TlsMode.REQUIRE:
        log.warning("serving the decrypted volume in plaintext beyond this host",
                    addresses=exposed, tls=tls.value)
    if opts.print_uri:
        for name in names:
            print("\n".join(readiness.uris(socks, name, tls is TlsMode.REQUIRE)), flush=True)
    if opts.pid_file:
        readiness.write_pid_file(opts.pid_file)
    readiness.notify("READY=1", f"MAINPID={os.getpid()}",
                     (f"STATUS=serving export {names[0]!r} on " if len(names) == 1
                      else f"STATUS=serving {len(names)} exports on ")
                     + ", ".join(address(s) for s in socks))
