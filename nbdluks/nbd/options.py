"""How a server process serves its connections: one object, one default each."""

from __future__ import annotations

from dataclasses import dataclass

from .handshake import TlsMode
from .tls import ServerCredentials

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerOptions:
    # Clients served at once; more are refused before the greeting. For the
    # whole server: each worker process takes its share.
    max_connections: int = 128
    # Bytes of requests in flight per connection before reading pauses.
    max_inflight: int = 64 * MiB
    # Bytes of request data held at once (reads until their reply has left,
    # writes until written); past it, reading pauses on every connection.
    # For the whole server: each worker process takes its share, and keeps
    # up to half of its share as reusable buffers.
    max_memory: int = 256 * MiB
    # I/O threads per process.
    threads: int = 8
    tls: TlsMode = TlsMode.OFF
    credentials: ServerCredentials | None = None
    # Seconds a client may take to negotiate, TLS handshake included (qemu-nbd's
    # --handshake-limit).
    handshake_timeout: float = 10.0
    # Seconds a client may keep a served connection waiting on it: a WRITE
    # whose data stops coming, or replies it does not read. Past it, that
    # connection is closed (and what it holds of the memory budget freed).
    stall_timeout: float = 30.0
    # Microseconds a connection's next request is awaited on the CPU once
    # its replies have left (nbd/poll.py); 0: the event loop sleeps at once.
    busy_poll_us: int = 50

    def __post_init__(self) -> None:
        if self.tls is not TlsMode.OFF and self.credentials is None:
            raise ValueError("TLS needs credentials")
