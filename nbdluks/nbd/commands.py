"""Transmission-phase rules, sans-IO: what an export advertises, which
requests are valid, which errno a failure maps to, how a request becomes
device calls and how results become reply frames."""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass

from ..block import BlockDevice, Extent
from .constants import (
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    MAX_PAYLOAD,
    STATE_HOLE,
    STATE_ZERO,
    Cmd,
    Errno,
    TxFlag,
)
from .handshake import BASE_ALLOCATION_ID, ExportInfo, Negotiated
from .wire import (
    Request,
    encode_block_status,
    encode_error_chunk,
    encode_offset_data_header,
    encode_offset_hole,
    encode_simple_reply,
)

Frames = list[bytes | memoryview]

# Plain ints only in these tables: they are used on every request.
# FUA is legal on every command once offered (the spec says a server MUST
# accept it on READ, FLUSH, CACHE and BLOCK_STATUS); only writes honour it.
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: FLAG_DF | FLAG_FUA,
    Cmd.WRITE: FLAG_FUA,
    Cmd.DISC: 0,
    Cmd.FLUSH: FLAG_FUA,
    Cmd.TRIM: FLAG_FUA,
    Cmd.CACHE: FLAG_FUA,
    Cmd.WRITE_ZEROES: FLAG_FUA | FLAG_NO_HOLE | FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: FLAG_REQ_ONE | FLAG_FUA,
}
# The transmission flag a client must have seen before using a command.
_NEEDS: dict[int, int] = {
    Cmd.TRIM: int(TxFlag.SEND_TRIM),
    Cmd.CACHE: int(TxFlag.SEND_CACHE),
    Cmd.WRITE_ZEROES: int(TxFlag.SEND_WRITE_ZEROES),
    Cmd.FLUSH: int(TxFlag.SEND_FLUSH),
}
_FLAG_NEEDS: tuple[tuple[int, int], ...] = (
    (FLAG_FUA, int(TxFlag.SEND_FUA)),
    (FLAG_DF, int(TxFlag.SEND_DF)),
    (FLAG_FAST_ZERO, int(TxFlag.SEND_FAST_ZERO)),
)
_READ_ONLY = int(TxFlag.READ_ONLY)
_WRITES = (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM)
# Most extents one BLOCK_STATUS reply carries; the client asks again for more.
MAX_EXTENTS = 1 << 16


@dataclass
class Export:
    """A device served under a name (read-only when the device is: it was
    opened so)."""

    name: str
    device: BlockDevice
    description: str = ""

    def info(self) -> ExportInfo:
        """What negotiation advertises: the device's capabilities as flags."""
        dev = self.device
        caps = dev.caps
        flags = TxFlag.HAS_FLAGS
        writable = caps.writable
        if not writable:
            flags |= TxFlag.READ_ONLY
        if caps.flush:
            flags |= TxFlag.SEND_FLUSH
        if writable:
            if caps.fua or caps.flush:  # the device contract emulates FUA by a flush
                flags |= TxFlag.SEND_FUA
            if caps.trim:
                flags |= TxFlag.SEND_TRIM
            if caps.zero:
                flags |= TxFlag.SEND_WRITE_ZEROES
                if caps.fast_zero:
                    flags |= TxFlag.SEND_FAST_ZERO
        if caps.multi_conn:
            flags |= TxFlag.CAN_MULTI_CONN
        if caps.cache:
            flags |= TxFlag.SEND_CACHE
        return ExportInfo(
            name=self.name,
            size=dev.size,
            flags=flags,
            description=self.description,
            min_block=dev.min_block,
            pref_block=dev.pref_block,
            max_block=min(dev.max_block or MAX_PAYLOAD, MAX_PAYLOAD),
        )


def validate(req: Request, neg: Negotiated) -> Errno:
    """Return the error a request gets before any I/O, or Errno.OK."""
    tx = int(neg.flags)
    err = _flags_error(req, tx)
    if err:
        return err
    # A read-only export does not advertise TRIM or WRITE_ZEROES, but the
    # spec asks for EPERM on any write there, so this check comes first.
    if req.cmd in _WRITES and tx & _READ_ONLY:
        return Errno.EPERM
    needs_tx = _NEEDS.get(req.cmd)
    if needs_tx is not None and not tx & needs_tx:
        return Errno.EINVAL
    if req.cmd == Cmd.BLOCK_STATUS and not neg.meta_contexts:
        return Errno.EINVAL
    if req.cmd in (Cmd.FLUSH, Cmd.DISC):
        return Errno.OK
    return _range_error(req, neg.export.size)


def _flags_error(req: Request, tx: int) -> Errno:
    """Unknown commands, flags the command does not take, flags not offered."""
    allowed = _ALLOWED_FLAGS.get(req.cmd)
    if allowed is None or req.flags & ~allowed:
        return Errno.EINVAL
    if req.flags:
        for flag, needs in _FLAG_NEEDS:
            if req.flags & flag and not tx & needs:
                return Errno.EINVAL
    return Errno.OK


def _range_error(req: Request, size: int) -> Errno:
    if req.length == 0:
        return Errno.EINVAL
    if req.offset + req.length > size:
        return Errno.ENOSPC if req.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
    if req.cmd in (Cmd.READ, Cmd.WRITE) and req.length > MAX_PAYLOAD:
        return Errno.EINVAL
    return Errno.OK


def errno_to_nbd(err: int | None) -> Errno:
    """Map an OSError errno to the error values NBD allows on the wire."""
    if err in (_errno.EDQUOT, _errno.EFBIG):
        return Errno.ENOSPC
    if err == _errno.EROFS:
        return Errno.EPERM
    if err is not None and err in Errno._value2member_map_ and err != 0:
        return Errno(err)
    return Errno.EIO


def read_flags(neg: Negotiated) -> int:
    """The flags a READ may carry on this connection."""
    tx = int(neg.flags)
    flags = _ALLOWED_FLAGS[Cmd.READ]
    for flag, needs in _FLAG_NEEDS:
        if not tx & needs:
            flags &= ~flag
    return flags


def error_reply(req: Request, neg: Negotiated, error: Errno, message: str = "") -> bytes:
    # Once structured replies are on, READ and BLOCK_STATUS errors are chunks.
    if neg.structured and req.cmd in (Cmd.READ, Cmd.BLOCK_STATUS):
        return encode_error_chunk(req.handle, error, message)
    return encode_simple_reply(req.handle, error)


def execute(dev: BlockDevice, req: Request, neg: Negotiated) -> Frames:
    """Run one valid request against the device (on a worker thread, or on
    the loop when it is quick) and return its reply frames."""
    cmd = req.cmd
    fua = bool(req.flags & FLAG_FUA)
    if cmd == Cmd.READ:
        return _read(dev, req, neg)
    if cmd == Cmd.WRITE:
        assert req.data is not None
        dev.pwrite(req.data, req.offset, fua=fua, owned=True)
    elif cmd == Cmd.FLUSH:
        dev.flush()
    elif cmd == Cmd.TRIM:
        dev.trim(req.offset, req.length, fua=fua)
    elif cmd == Cmd.WRITE_ZEROES:
        dev.write_zeroes(req.offset, req.length, fua=fua,
                         may_trim=not req.flags & FLAG_NO_HOLE,
                         fast=bool(req.flags & FLAG_FAST_ZERO))
    elif cmd == Cmd.CACHE:
        dev.cache(req.offset, req.length)
    elif cmd == Cmd.BLOCK_STATUS:
        return [block_status_reply(req, dev.extents(req.offset, req.length))]
    return [encode_simple_reply(req.handle)]


def _read(dev: BlockDevice, req: Request, neg: Negotiated) -> Frames:
    extents = None
    if neg.structured and not req.flags & FLAG_DF:
        extents = dev.read_extents(req.offset, req.length)
    plan = read_reply_headers(req, neg, extents)
    # Every byte that is sent gets read into: a pooled buffer's old contents
    # never leave (devices fail a read they cannot fill).
    buf = memoryview(req.buffer if req.buffer is not None else bytearray(req.length))
    frames: Frames = []
    for header, start, n in plan:
        frames.append(header)
        if n:
            dev.pread_into(buf[start : start + n], req.offset + start)
            frames.append(buf[start : start + n])
    return frames


def read_reply_headers(
    req: Request, neg: Negotiated, extents: list[Extent] | None
) -> list[tuple[bytes, int, int]]:
    """Plan a successful READ reply: (header, data offset, data length) tuples
    relative to the request; a hole has data length 0.

    Holes are sent as OFFSET_HOLE only in structured mode without DF and when
    the device reports them (`extents` not None).
    """
    if not neg.structured:
        return [(encode_simple_reply(req.handle), 0, req.length)]
    if extents is None or req.flags & FLAG_DF:
        header = encode_offset_data_header(req.handle, req.offset, req.length, True)
        return [(header, 0, req.length)]
    plan: list[tuple[bool, int, int]] = []  # (hole, start, length)
    pos = 0
    for ext in extents:
        n = min(ext.length, req.length - pos)
        if n <= 0:
            break
        hole = ext.zero
        if plan and plan[-1][0] == hole:
            plan[-1] = (hole, plan[-1][1], plan[-1][2] + n)
        else:
            plan.append((hole, pos, n))
        pos += n
    if pos < req.length:  # a device that reported too little: read the rest
        plan.append((False, pos, req.length - pos))
    out = []
    for i, (hole, start, n) in enumerate(plan):
        done = i == len(plan) - 1
        if hole:
            out.append((encode_offset_hole(req.handle, req.offset + start, n, done), start, 0))
        else:
            out.append(
                (encode_offset_data_header(req.handle, req.offset + start, n, done), start, n)
            )
    return out


def block_status_reply(req: Request, extents: list[Extent]) -> bytes:
    pairs: list[tuple[int, int]] = []
    remaining = req.length
    for ext in extents:
        n = min(ext.length, remaining)
        if n <= 0:
            break
        flags = (STATE_HOLE if ext.hole else 0) | (STATE_ZERO if ext.zero else 0)
        if pairs and pairs[-1][1] == flags:
            pairs[-1] = (pairs[-1][0] + n, flags)
        else:
            pairs.append((n, flags))
        remaining -= n
        if len(pairs) >= MAX_EXTENTS:
            break
    if not pairs:
        raise OSError(_errno.EIO, "device reported no extents")
    if req.flags & FLAG_REQ_ONE:
        pairs = pairs[:1]
    return encode_block_status(req.handle, BASE_ALLOCATION_ID, pairs, True)
