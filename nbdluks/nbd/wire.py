"""Sans-IO codec for the NBD wire format: bytes in, typed messages out.
Nothing here touches a socket; the server, the client and the tests feed
bytes and take encoded frames back."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..errors import NbdluksError
from .constants import (
    CHUNK_FLAG_DONE,
    CHUNK_HEADER_SIZE,
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    REQUEST_SIZE,
    SIMPLE_REPLY_MAGIC,
    SIMPLE_REPLY_SIZE,
    STRUCTURED_REPLY_MAGIC,
    Chunk,
    Cmd,
    Info,
)


class ProtocolError(NbdluksError):
    """The protocol was broken: the connection must end."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that cannot be parsed or are not allowed here."""


class LocalProtocolError(ProtocolError):
    """We were about to break the protocol (a bug on our side, or a value
    that does not fit the wire format)."""


_GREETING: Final = struct.Struct(">QQH")
_OPTION: Final = struct.Struct(">QII")
_OPTION_REPLY: Final = struct.Struct(">QIII")
_REQUEST: Final = struct.Struct(">IHHQQI")
_SIMPLE_REPLY: Final = struct.Struct(">IIQ")
_CHUNK: Final = struct.Struct(">IHHQI")
_HOLE: Final = struct.Struct(">QI")
_ERROR: Final = struct.Struct(">IH")
_EXTENT: Final = struct.Struct(">II")
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")


# --- handshake ------------------------------------------------------------


def encode_greeting(handshake_flags: int) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def decode_greeting(data: bytes) -> int:
    """Return the server's handshake flags (client side)."""
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise RemoteProtocolError("bad NBD magic from server")
    if opt_magic != IHAVEOPT:
        raise RemoteProtocolError("server does not speak newstyle negotiation")
    return int(flags)


def encode_client_flags(flags: int) -> bytes:
    return _U32.pack(flags)


def decode_client_flags(data: bytes | bytearray) -> int:
    return int(_U32.unpack_from(data)[0])


def encode_option(option: int, data: bytes = b"") -> bytes:
    return _OPTION.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """Return (option, length) of a client option header."""
    magic, option, length = _OPTION.unpack_from(data)
    if magic != IHAVEOPT:
        raise RemoteProtocolError(f"bad option magic {magic:#x}")
    return option, length


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes | bytearray) -> tuple[int, int, int]:
    """Return (option, reply type, length) of a server option reply header."""
    magic, option, reply, length = _OPTION_REPLY.unpack_from(data)
    if magic != OPTION_REPLY_MAGIC:
        raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
    return option, reply, length


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))


def encode_list_reply(name: str, description: str) -> bytes:
    """Payload of a REP_SERVER reply to LIST."""
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + description.encode()


def encode_meta_context_reply(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


def encode_info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return _U16.pack(Info.NAME) + name.encode()


def encode_info_description(description: str) -> bytes:
    return _U16.pack(Info.DESCRIPTION) + description.encode()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", Info.BLOCK_SIZE, minimum, preferred, maximum)


_INFO_FIELDS: Final[dict[int, struct.Struct]] = {
    Info.EXPORT: struct.Struct(">QH"), Info.BLOCK_SIZE: struct.Struct(">III"),
}


def decode_info(data: bytes) -> tuple[int, tuple[int, ...]]:
    """An INFO reply's type and fields (client side): EXPORT gives (size,
    flags), BLOCK_SIZE (minimum, preferred, maximum); other types ()."""
    if len(data) < 2:
        raise RemoteProtocolError("INFO reply too short")
    kind = int(_U16.unpack_from(data)[0])
    fields = _INFO_FIELDS.get(kind)
    if fields is None:
        return kind, ()
    if len(data) != 2 + fields.size:
        raise RemoteProtocolError(f"INFO reply of type {kind} has {len(data)} bytes")
    return kind, tuple(fields.unpack_from(data, 2))


def encode_export_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    """Payload of INFO / GO (client side)."""
    raw = name.encode()
    return (
        _U32.pack(len(raw))
        + raw
        + _U16.pack(len(infos))
        + b"".join(_U16.pack(i) for i in infos)
    )


def encode_meta_context_request(name: str, queries: tuple[str, ...]) -> bytes:
    """Payload of LIST_META_CONTEXT / SET_META_CONTEXT (client side)."""
    raw = name.encode()
    out = [_U32.pack(len(raw)), raw, _U32.pack(len(queries))]
    for q in queries:
        qb = q.encode()
        out += [_U32.pack(len(qb)), qb]
    return b"".join(out)


class Cursor:
    """Reads big-endian fields from an option payload; short data is a ValueError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise ValueError("option payload too short")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def string(self, n: int) -> str:
        try:
            return self._take(n).decode()
        except UnicodeDecodeError as e:
            raise ValueError("string is not UTF-8") from e

    def at_end(self) -> bool:
        return self._pos == len(self._data)


# --- transmission: requests -----------------------------------------------


@dataclass(slots=True)
class Request:
    flags: int
    cmd: int
    handle: int
    offset: int
    length: int
    # WRITE only: the data to write; None when it was too large and was skipped.
    data: bytearray | None = None
    # READ only: where the server puts the data (from its buffer pool).
    buffer: bytearray | None = None
    # time.monotonic_ns() when the server started it
    started: int = 0

    @property
    def oversized(self) -> bool:
        return self.cmd == Cmd.WRITE and self.data is None


# WRITE payload parts this large are kept as views of their chunk, smaller
# ones gathered into copies of about this size.
_VIEWED_PART = 64 * 1024


def encode_request(flags: int, cmd: int, handle: int, offset: int, length: int) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, cmd, handle, offset, length)


class RequestDecoder:
    """Incremental decoder of the client's request stream.

    A WRITE's payload (up to MAX_PAYLOAD) that comes in parts is kept as
    those parts and copied into one buffer once complete: a WRITE holds
    what its client sent, never what it announced. `data_in` counts payload
    bytes taken since the owner reset it (to charge its budget). Larger
    payloads are skipped so the stream stays in sync and the request can be
    failed without dropping the connection."""

    def __init__(self, max_payload: int = MAX_PAYLOAD,
                 alloc: Callable[[int], bytearray] = bytearray) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload
        self._alloc = alloc  # payload buffers; their contents are overwritten
        self._pending: Request | None = None  # WRITE waiting for its payload
        self._parts: list[bytearray | memoryview] = []  # what came of its payload
        self._filled = 0
        self._skip = 0
        self.data_in = 0

    @property
    def idle(self) -> bool:  # no request partly in: the next byte starts a header
        return self._pending is None and not self._buf

    @property
    def mid_write(self) -> bool:  # a WRITE's data is partly in
        return self._pending is not None

    @property
    def partial(self) -> int:  # bytes of the pending WRITE's payload held
        return self._filled

    def abandon(self) -> int:  # the stream ends: bytes held of an unfinished WRITE
        held, self._pending, self._parts, self._filled = self._filled, None, [], 0
        return held

    def feed(self, data: bytes | bytearray | memoryview) -> list[Request]:
        out: list[Request] = []
        view = memoryview(data)
        while view:
            if self._pending is not None:
                view = self._write_data(self._pending, view, out)
            else:
                view = self._header(view, out)
        return out

    def _write_data(self, req: Request, view: memoryview, out: list[Request]) -> memoryview:
        """Take the pending WRITE's data (or skip it when it is too large)."""
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            if self._skip == 0:
                out.append(req)
                self._pending = None
            return view[n:]
        need = req.length - self._filled
        n = min(need, len(view))
        self.data_in += n
        if n < need:  # more to come: keep this part
            self._keep(view[:n])
            self._filled += n
            return view[n:]
        req.data = data = self._alloc(req.length)
        pos = 0
        for part in self._parts:
            data[pos : pos + len(part)] = part
            pos += len(part)
        data[pos:] = view[:n]
        self._parts.clear()
        self._filled = 0
        self._pending = None
        out.append(req)
        return view[n:]

    def _keep(self, part: memoryview) -> None:
        """A large part of an immutable chunk is kept as a view of it; small
        ones (a view per byte costs more than the byte) and parts of
        buffers that may change are copied together."""
        if len(part) >= _VIEWED_PART and isinstance(part.obj, bytes):
            self._parts.append(part)
            return
        tail = self._parts[-1] if self._parts else None
        if isinstance(tail, bytearray) and len(tail) < _VIEWED_PART:
            tail += part
        else:
            self._parts.append(bytearray(part))

    def _header(self, view: memoryview, out: list[Request]) -> memoryview:
        """Take one request header (gathering exactly REQUEST_SIZE bytes)."""
        if self._buf or len(view) < REQUEST_SIZE:
            need = REQUEST_SIZE - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) < REQUEST_SIZE:
                return view
            header: bytes | memoryview = bytes(self._buf)
            self._buf.clear()
        else:
            header = view[:REQUEST_SIZE]
            view = view[REQUEST_SIZE:]
        req = self._parse(header)
        if req.cmd == Cmd.WRITE and req.length:
            self._pending = req
            if req.length > self._max_payload:
                self._skip = req.length
        else:
            if req.cmd == Cmd.WRITE:
                req.data = bytearray()
            out.append(req)
        return view

    @staticmethod
    def _parse(header: bytes | memoryview) -> Request:
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(header)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        return Request(flags, cmd, handle, offset, length)


# --- transmission: replies ------------------------------------------------


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def encode_chunk_header(handle: int, chunk_type: int, length: int, done: bool) -> bytes:
    flags = CHUNK_FLAG_DONE if done else 0
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, chunk_type, handle, length)


def encode_offset_data_header(handle: int, offset: int, length: int, done: bool) -> bytes:
    """Chunk header plus offset; the caller sends `length` data bytes after it."""
    return encode_chunk_header(handle, Chunk.OFFSET_DATA, 8 + length, done) + _U64.pack(offset)


def encode_offset_hole(handle: int, offset: int, length: int, done: bool) -> bytes:
    return encode_chunk_header(handle, Chunk.OFFSET_HOLE, 12, done) + _HOLE.pack(offset, length)


def encode_error_chunk(handle: int, error: int, message: str = "") -> bytes:
    msg = message.encode()[:MAX_STRING]
    return (encode_chunk_header(handle, Chunk.ERROR, 6 + len(msg), True)
            + _ERROR.pack(error, len(msg)) + msg)


def encode_block_status(
    handle: int, context_id: int, extents: list[tuple[int, int]], done: bool
) -> bytes:
    """BLOCK_STATUS chunk: extents are (length, flags) pairs."""
    body = _U32.pack(context_id) + b"".join(_EXTENT.pack(ln, fl) for ln, fl in extents)
    return encode_chunk_header(handle, Chunk.BLOCK_STATUS, len(body), done) + body


@dataclass(slots=True, frozen=True)
class SimpleReply:
    handle: int
    error: int


@dataclass(slots=True, frozen=True)
class ChunkHeader:
    flags: int
    type: int
    handle: int
    length: int

    @property
    def done(self) -> bool:
        return bool(self.flags & CHUNK_FLAG_DONE)


def reply_header_size(magic: bytes | bytearray | memoryview) -> int:
    """From a reply's first 4 bytes: its header size, 16 (simple) or 20 (chunk)."""
    value = int(_U32.unpack_from(magic)[0])
    if value == SIMPLE_REPLY_MAGIC:
        return SIMPLE_REPLY_SIZE
    if value == STRUCTURED_REPLY_MAGIC:
        return CHUNK_HEADER_SIZE
    raise RemoteProtocolError(f"bad reply magic {value:#x}")


def decode_offset(data: bytes) -> int:  # the offset an OFFSET_DATA chunk's payload starts with
    return int(_U64.unpack(data)[0])


def decode_offset_hole(data: bytes) -> tuple[int, int]:
    """An OFFSET_HOLE chunk's payload: (offset, length)."""
    offset, length = _HOLE.unpack(data)
    return int(offset), int(length)


def decode_error_chunk(body: bytes) -> tuple[int, str]:
    """An ERROR / ERROR_OFFSET chunk's payload: (error, message)."""
    if len(body) < 6:
        raise RemoteProtocolError("error chunk too short")
    error, n = _ERROR.unpack_from(body)
    return int(error), body[6 : 6 + n].decode("utf-8", "replace")


def decode_reply_header(data: bytes | bytearray | memoryview) -> SimpleReply | ChunkHeader:
    """Decode a reply header: 16 bytes (simple) or 20 (structured chunk);
    `reply_header_size` tells which from the first 4."""
    magic = int(_U32.unpack_from(data)[0])
    if magic == SIMPLE_REPLY_MAGIC:
        _, error, handle = _SIMPLE_REPLY.unpack_from(data)
        return SimpleReply(handle, error)
    if magic == STRUCTURED_REPLY_MAGIC:
        _, flags, ctype, handle, length = _CHUNK.unpack_from(data)
        return ChunkHeader(flags, ctype, handle, length)
    raise RemoteProtocolError(f"bad reply magic {magic:#x}")
