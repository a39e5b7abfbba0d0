"""An export of another NBD server as a BlockDevice."""

from __future__ import annotations

import errno

from ..nbd.client import NbdClient
from ..nbd.constants import Cmd, CmdFlag, TxFlag
from ..nbd.uri import NbdUri
from .base import BlockDevice, Capabilities, check_range


class NbdDevice(BlockDevice):
    def __init__(self, uri: NbdUri, *, read_only: bool = False,
                 request_timeout: float = 60.0) -> None:
        self.client = c = NbdClient(uri, request_timeout=request_timeout)
        self.size = c.size
        self.min_block = c.min_block or 1
        self.pref_block = c.pref_block or 4096
        self.max_block = c.max_block
        f = c.flags
        writable = not read_only and not f & TxFlag.READ_ONLY
        self.caps = Capabilities(
            writable=writable,
            flush=bool(f & TxFlag.SEND_FLUSH),
            fua=writable and bool(f & TxFlag.SEND_FUA),
            trim=writable and bool(f & TxFlag.SEND_TRIM),
            zero=writable and bool(f & TxFlag.SEND_WRITE_ZEROES),
            fast_zero=writable and bool(f & TxFlag.SEND_FAST_ZERO),
            cache=bool(f & TxFlag.SEND_CACHE),
            # All our connections share this one upstream connection, so a
            # FLUSH on it covers every write any of them completed.
            multi_conn=True,
        )

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self.max_block
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def pread_into(self, buf: memoryview, offset: int) -> None:
        check_range(self, offset, len(buf))
        for o, n in self._pieces(offset, len(buf)):
            self.client.request(Cmd.READ, o, n, buf=buf[o - offset : o - offset + n])

    def pwrite(
        self, buf: bytes | bytearray | memoryview, offset: int, fua: bool = False, *,
        owned: bool = False,
    ) -> None:
        if not self.caps.writable:
            raise OSError(errno.EPERM, "the upstream export is read-only")
        check_range(self, offset, len(buf))
        view = memoryview(buf)
        flags = CmdFlag.FUA if fua and self.caps.fua else 0
        for o, n in self._pieces(offset, len(buf)):
            self.client.request(Cmd.WRITE, o, n, flags=flags,
                                payload=view[o - offset : o - offset + n])
        if fua and not self.caps.fua:
            self.flush()

    def flush(self) -> None:
        if self.caps.flush:
            self.client.request(Cmd.FLUSH, 0, 0)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        flags = CmdFlag.FUA if fua and self.caps.fua else 0
        for o, n in self._pieces(offset, length):
            self.client.request(Cmd.TRIM, o, n, flags=flags)

    def write_zeroes(
        self, offset: int, length: int, *, fua: bool = False, may_trim: bool = False,
        fast: bool = False,
    ) -> None:
        flags = (CmdFlag.FUA if fua and self.caps.fua else 0) | (
            0 if may_trim else CmdFlag.NO_HOLE) | (CmdFlag.FAST_ZERO if fast else 0)
        for o, n in self._pieces(offset, length):
            self.client.request(Cmd.WRITE_ZEROES, o, n, flags=flags)

    def cache(self, offset: int, length: int) -> None:
        for o, n in self._pieces(offset, length):
            self.client.request(Cmd.CACHE, o, n)

    def close(self) -> None:
        self.client.close()
