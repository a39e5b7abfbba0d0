"""The transmission fast path: runs of small READs answered in C
(_transmit.c) straight from the bytes a client sent, for devices that say
how to read them directly (BlockDevice.direct_read: a file, or a LUKS
volume over one with AES-XTS and a plain IV). The C code takes only what it
is sure of and stops at anything else; the connection's Python path takes
the rest and stays the reference for every rule. Without the helper built
(or with NBDLUKS_NATIVE=0) every request takes the Python path."""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Protocol

from .. import native
from ..block import BlockDevice
from .commands import read_flags
from .handshake import Negotiated

_transmit = native.load("nbdluks.nbd._transmit")
AVAILABLE = _transmit is not None
# A unix socket's send buffer: a 256 KiB reply leaves in one sendfile (the
# kernel caps it at twice wmem_max, 416 KiB by default).
_UNIX_SNDBUF = 1024 * 1024
# Most reply bytes one call makes: a run of reads is answered (and its
# buffer held) in pieces of this size.
LIMIT = 256 * 1024


class Reader(Protocol):
    def serve(self, data: bytes | memoryview, pos: int, limit: int
              ) -> tuple[int, bytes | None, int, int]:
        """Answer the READs it takes from data[pos:]: (where the first one
        not answered starts, the replies, how many, data bytes)."""
        ...

    def send(self, data: bytes | memoryview, pos: int, limit: int
             ) -> tuple[int, bytes | None, int, int]:
        """serve(), the replies written to the socket (long ones spliced from
        the page cache) while the transport has nothing queued; the bytes it
        did not take come back in place of the replies, to be sent first."""
        ...

    def close(self) -> None: ...


def reader(dev: BlockDevice, neg: Negotiated, sock: int = -1) -> Reader | None:
    """A reader of `dev` for one connection, on the thread that serves it,
    which may write to the connection's socket `sock` itself (-1: never; a
    TLS connection's bytes are the transport's to write); None: its
    requests all take the Python path."""
    if _transmit is None:
        return None
    direct = dev.direct_read()
    if direct is None:
        return None
    d = direct.decrypt
    r: Reader = _transmit.Reader(
        direct.fd, direct.base, direct.size, direct.align, direct.max_length,
        direct.max_cached, direct.sparse_min, read_flags(neg), neg.structured, direct.keep,
        *((d.init, d.update, d.ctx, d.iv_mode, d.iv_first, d.iv_step, d.unit)
          if d is not None else (0, 0, 0, 0, 0, 0, 0)), sock)
    return r


def poll(sock: int, epfd: int, budget_ns: int) -> bytes | None:
    """The client's next bytes, awaited on the CPU (nbd/poll.py): b"" when
    the event loop has other bytes to read first (or this socket's end)."""
    assert _transmit is not None
    got: bytes | None = _transmit.poll(sock, epfd, budget_ns)
    return got


def socket_of(transport: Any) -> int:
    """The socket of a plain (not TLS) transport, that the fast path may
    write replies to (-1: none). A unix socket's send buffer is raised to
    hold a long reply whole, not split between sendfile and the transport
    (raw nbdcopy reads 1.4-1.7x). TCP tunes its own."""
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        return -1
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _UNIX_SNDBUF)
    return int(sock.fileno())
