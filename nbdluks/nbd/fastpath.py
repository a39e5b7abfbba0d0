"""The transmission fast path: runs of small READs answered in C
(_transmit.c) straight from the bytes a client sent, for devices that say
how to read them directly (BlockDevice.direct_read: a file, or a LUKS
volume over one with AES-XTS and a plain IV). The C code takes only what it
is sure of and stops at anything else; the connection's Python path takes
the rest and stays the reference for every rule. Without the helper built
(or with NBDLUKS_NATIVE=0) every request takes the Python path."""

from __future__ import annotations

from typing import Protocol

from .. import native
from ..block import BlockDevice
from .commands import read_flags
from .handshake import Negotiated

_transmit = native.load("nbdluks.nbd._transmit")
AVAILABLE = _transmit is not None
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
