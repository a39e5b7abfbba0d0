"""The transmission rules, driven directly (no sockets): what an export
advertises, which requests are refused with which errno, how a request
becomes device calls and reply frames."""

from __future__ import annotations

import dataclasses
import errno
import struct

import pytest

from nbdluks.block.base import Capabilities
from nbdluks.nbd.commands import (
    Export,
    block_status_reply,
    errno_to_nbd,
    error_reply,
    execute,
    read_reply_headers,
    validate,
)
from nbdluks.nbd.constants import MAX_PAYLOAD, Chunk, Cmd, CmdFlag, Errno, TxFlag
from nbdluks.nbd.handshake import BASE_ALLOCATION_ID, Negotiated
from nbdluks.nbd.wire import Request
from tests.block.memory import MemoryDevice

SIZE = 1 << 27
FUA, DF, NO_HOLE, FAST_ZERO, REQ_ONE = (int(f) for f in (
    CmdFlag.FUA, CmdFlag.DF, CmdFlag.NO_HOLE, CmdFlag.FAST_ZERO, CmdFlag.REQ_ONE))


def negotiated(export: Export, *, structured: bool = True, meta: bool = True) -> Negotiated:
    info = export.info()
    flags = info.flags | (TxFlag.SEND_DF if structured else 0)
    return Negotiated(info, flags, structured, no_zeroes=True,
                      meta_contexts={BASE_ALLOCATION_ID: "base:allocation"} if meta else {})


def req(cmd: Cmd, offset: int = 0, length: int = 4096, flags: int = 0) -> Request:
    r = Request(flags, cmd, handle=7, offset=offset, length=length)
    if cmd == Cmd.WRITE:
        r.data = bytearray(b"w" * length)
    return r


@pytest.fixture
def dev() -> MemoryDevice:
    return MemoryDevice(SIZE)


def read_only(dev: MemoryDevice) -> MemoryDevice:
    """The device as opened read-only: every capability but writing."""
    return MemoryDevice(dev.size, dataclasses.replace(dev.caps, writable=False))


def test_advertised_flags_follow_the_device(dev: MemoryDevice) -> None:
    flags = Export("", dev).info().flags
    for f in (TxFlag.SEND_FLUSH, TxFlag.SEND_FUA, TxFlag.SEND_TRIM, TxFlag.SEND_WRITE_ZEROES,
              TxFlag.SEND_FAST_ZERO, TxFlag.SEND_CACHE):
        assert f in flags
    assert TxFlag.READ_ONLY not in flags and TxFlag.CAN_MULTI_CONN not in flags
    ro = Export("", read_only(dev)).info().flags
    assert TxFlag.READ_ONLY in ro and TxFlag.SEND_TRIM not in ro and TxFlag.SEND_FUA not in ro
    # FUA emulated by flush is still FUA; without flush there is neither
    flush_only = MemoryDevice(SIZE, Capabilities(writable=True, flush=True))
    assert TxFlag.SEND_FUA in Export("", flush_only).info().flags
    bare = MemoryDevice(SIZE, Capabilities(writable=True))
    assert not Export("", bare).info().flags & (TxFlag.SEND_FUA | TxFlag.SEND_FLUSH)


def test_block_size_info_is_capped_at_the_protocol_maximum(dev: MemoryDevice) -> None:
    assert Export("", dev).info().max_block == MAX_PAYLOAD
    dev.max_block = 1 << 16
    assert Export("", dev).info().max_block == 1 << 16


@pytest.mark.parametrize(("request_", "expected"), [
    (req(Cmd.READ), Errno.OK),
    (req(Cmd.READ, SIZE - 4096), Errno.OK),
    (req(Cmd.READ, SIZE - 4095), Errno.EINVAL),  # past the end
    (req(Cmd.WRITE, SIZE - 4095), Errno.ENOSPC),  # writes past the end: ENOSPC
    (req(Cmd.WRITE_ZEROES, SIZE, 1), Errno.ENOSPC),
    (req(Cmd.READ, 0, 0), Errno.EINVAL),  # zero length
    (req(Cmd.FLUSH, 0, 0), Errno.OK),
    (req(Cmd.READ, flags=FUA), Errno.OK),  # FUA is legal everywhere, honoured on writes
    (req(Cmd.FLUSH, 0, 0, FUA), Errno.OK),
    (req(Cmd.CACHE, flags=FUA), Errno.OK),
    (req(Cmd.BLOCK_STATUS, flags=FUA | REQ_ONE), Errno.OK),
    (req(Cmd.READ, 0, MAX_PAYLOAD), Errno.OK),
    (req(Cmd.READ, 0, MAX_PAYLOAD + 1), Errno.EINVAL),
    (req(Cmd.WRITE, flags=FUA), Errno.OK),
    (req(Cmd.WRITE, flags=DF), Errno.EINVAL),
    (req(Cmd.READ, flags=DF), Errno.OK),
    (req(Cmd.WRITE_ZEROES, flags=FUA | NO_HOLE | FAST_ZERO), Errno.OK),
    (req(Cmd.BLOCK_STATUS, flags=REQ_ONE), Errno.OK),
    (Request(0, 99, 7, 0, 1), Errno.EINVAL),  # unknown command
    (req(Cmd.READ, flags=0x100), Errno.EINVAL),  # unknown flag
])
def test_validation(dev: MemoryDevice, request_: Request, expected: Errno) -> None:
    assert validate(request_, negotiated(Export("", dev))) == expected


def test_writes_to_a_read_only_export_get_eperm_first(dev: MemoryDevice) -> None:
    neg = negotiated(Export("", read_only(dev)))
    for cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM):
        assert validate(req(cmd), neg) == Errno.EPERM
        assert validate(req(cmd, SIZE, 4096), neg) == Errno.EPERM  # before the range check
    assert validate(req(Cmd.READ), neg) == Errno.OK


def test_commands_and_flags_the_client_was_not_offered(dev: MemoryDevice) -> None:
    bare = Export("", MemoryDevice(SIZE, Capabilities(writable=True)))
    neg = negotiated(bare, structured=False, meta=False)
    for cmd in (Cmd.FLUSH, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS):
        assert validate(req(cmd, 0, 0 if cmd == Cmd.FLUSH else 4096), neg) == Errno.EINVAL
    assert validate(req(Cmd.WRITE, flags=FUA), neg) == Errno.EINVAL
    assert validate(req(Cmd.READ, flags=DF), neg) == Errno.EINVAL  # DF needs structured replies


def test_errno_mapping() -> None:
    assert errno_to_nbd(errno.EDQUOT) == Errno.ENOSPC
    assert errno_to_nbd(errno.EFBIG) == Errno.ENOSPC
    assert errno_to_nbd(errno.EROFS) == Errno.EPERM
    assert errno_to_nbd(errno.ENOTSUP) == Errno.ENOTSUP
    assert errno_to_nbd(errno.ENOENT) == Errno.EIO
    assert errno_to_nbd(None) == Errno.EIO
    assert errno_to_nbd(0) == Errno.EIO


def test_errors_are_chunks_only_for_reads_and_block_status_in_structured_mode(
        dev: MemoryDevice) -> None:
    neg = negotiated(Export("", dev))
    assert error_reply(req(Cmd.READ), neg, Errno.EIO, "x")[:4] == struct.pack(">I", 0x668E33EF)
    assert error_reply(req(Cmd.WRITE), neg, Errno.EIO)[:4] == struct.pack(">I", 0x67446698)
    simple = negotiated(Export("", dev), structured=False)
    assert error_reply(req(Cmd.READ), simple, Errno.EIO)[:4] == struct.pack(">I", 0x67446698)


def test_execute_maps_flags_to_device_calls(dev: MemoryDevice) -> None:
    neg = negotiated(Export("", dev))
    execute(dev, req(Cmd.WRITE, 4096, 8, FUA), neg)
    execute(dev, req(Cmd.WRITE_ZEROES, 0, 512, NO_HOLE), neg)
    execute(dev, req(Cmd.WRITE_ZEROES, 0, 512, FAST_ZERO), neg)
    execute(dev, req(Cmd.TRIM, 0, 512, FUA), neg)
    execute(dev, req(Cmd.FLUSH, 0, 0), neg)
    execute(dev, req(Cmd.CACHE, 0, 512), neg)
    assert dev.calls == [
        ("write", 4096, 8, True),
        ("zero", 0, 512, False, False, False),
        ("zero", 0, 512, False, True, True),
        ("trim", 0, 512, True),
        ("flush",),
        ("cache", 0, 512),
    ]
    assert dev.data[4096:4104] == b"w" * 8


def test_reads_skip_holes_unless_df(dev: MemoryDevice) -> None:
    dev.data[:] = b"d" * SIZE
    dev.holes = [(65536, 65536)]
    neg = negotiated(Export("", dev))
    frames = execute(dev, req(Cmd.READ, 0, 3 * 65536), neg)
    chunk_types = [struct.unpack_from(">H", f, 6)[0] for f in frames if len(f) in (28, 32)]
    assert chunk_types == [Chunk.OFFSET_DATA, Chunk.OFFSET_HOLE, Chunk.OFFSET_DATA]
    data = b"".join(bytes(f) for f in frames if len(f) == 65536)
    assert data == b"d" * 2 * 65536  # the hole's bytes were never read
    frames = execute(dev, req(Cmd.READ, 0, 3 * 65536, DF), neg)
    assert len(frames) == 2 and len(frames[1]) == 3 * 65536


def test_read_plan_covers_the_request_even_when_extents_fall_short() -> None:
    from nbdluks.block.base import Extent

    r = req(Cmd.READ, 0, 8192)
    neg = Negotiated(Export("", MemoryDevice(SIZE)).info(), TxFlag.HAS_FLAGS, True, True)
    plan = read_reply_headers(r, neg, [Extent(4096, hole=True, zero=True)])
    assert [(start, n) for _, start, n in plan] == [(0, 0), (4096, 4096)]


def test_block_status_merges_and_honours_req_one(dev: MemoryDevice) -> None:
    from nbdluks.block.base import Extent

    extents = [Extent(4096), Extent(4096), Extent(8192, hole=True, zero=True), Extent(4096)]
    body = block_status_reply(req(Cmd.BLOCK_STATUS, 0, 20480), extents)[20:]
    assert struct.unpack(">IIIIIII", body) == (BASE_ALLOCATION_ID, 8192, 0, 8192, 3, 4096, 0)
    one = block_status_reply(req(Cmd.BLOCK_STATUS, 0, 20480, REQ_ONE), extents)[20:]
    assert struct.unpack(">III", one) == (BASE_ALLOCATION_ID, 8192, 0)
    with pytest.raises(OSError):
        block_status_reply(req(Cmd.BLOCK_STATUS), [])
