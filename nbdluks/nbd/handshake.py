"""Sans-IO state machine for the server side of fixed-newstyle negotiation.

Feed the client's bytes with `receive_data`; take what to send with
`data_to_send`; watch `state`. Option errors are answered on the wire and
negotiation goes on; only a stream that cannot be parsed (or a client that
asks for it) ends the connection. An option naming an export that is still
coming (`waiting`) is held (state WAITING, `waiting_for`) until the adapter
calls `resume`, and then answered as if it came just then.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .constants import (
    BASE_ALLOCATION,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    OPTION_HEADER_SIZE,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from .wire import (
    Cursor,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    decode_client_flags,
    decode_option_header,
    encode_export_name_reply,
    encode_greeting,
    encode_info_block_size,
    encode_info_description,
    encode_info_export,
    encode_info_name,
    encode_list_reply,
    encode_meta_context_reply,
    encode_option_reply,
)

BASE_ALLOCATION_ID = 1
META_CONTEXTS = {BASE_ALLOCATION: BASE_ALLOCATION_ID}


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What negotiation tells a client about one export."""

    name: str
    size: int
    flags: TxFlag
    description: str = ""
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = MAX_PAYLOAD


@dataclass(slots=True)
class Negotiated:
    export: ExportInfo
    flags: TxFlag
    structured: bool
    no_zeroes: bool
    meta_contexts: dict[int, str] = field(default_factory=dict)


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_START = "tls-start"  # STARTTLS answered: the adapter runs the TLS handshake
    WAITING = "waiting"  # an option holds for an export still coming (waiting_for)
    DONE = "done"  # export chosen: transmission starts
    CLOSED = "closed"  # client aborted or stream broken


class TlsMode(enum.Enum):
    OFF = "off"  # STARTTLS refused
    ON = "on"  # the client chooses
    REQUIRE = "require"  # nothing but STARTTLS and ABORT before TLS


class Handshake:
    def __init__(self, exports: Mapping[str, ExportInfo], tls: TlsMode = TlsMode.OFF,
                 waiting: Container[str] = (), failed: Container[str] = ()) -> None:
        """`waiting`: names of exports still coming; `failed`: of those that
        could not be made ready (both looked at when an option names one)."""
        self._exports = exports
        self._waiting = waiting
        self._failed = failed
        self.waiting_for: str | None = None
        self._held: tuple[int, bytes] | None = None  # the option waiting_for holds
        self.tls = tls
        self.tls_active = False
        self._buf = bytearray()
        self._out: list[bytes] = [
            encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        ]
        self._skip = 0  # bytes of an oversized option still to discard
        self.state = State.CLIENT_FLAGS
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self.result: Negotiated | None = None
        # Bytes received after the final option: the first requests.
        self.leftover = b""
        self.close_reason = ""

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.state in (State.DONE, State.CLOSED):
            self.leftover += data
            return
        if self.state is State.WAITING:
            self._buf += data
            return
        if self.state is State.TLS_START:
            # The adapter stops reading at STARTTLS: these would be TLS records.
            self.state = State.CLOSED
            self.close_reason = "plaintext data during the TLS upgrade"
            return
        self._buf += data
        self._step(self._run)

    def resume(self) -> None:
        """The export an option waits for is settled: answer the option
        (and whatever came after it)."""
        if self.state is not State.WAITING or self._held is None:
            raise LocalProtocolError("no option is waiting")
        (option, data), self._held = self._held, None
        self.state, self.waiting_for = State.OPTIONS, None

        def again() -> None:
            self._option(option, data)
            self._run()
        self._step(again)

    def _step(self, run: Callable[[], None]) -> None:
        try:
            run()
        except ProtocolError as e:
            self.state = State.CLOSED
            self.close_reason = str(e)

    def _wait(self, option: int, data: bytes, name: str) -> bool:
        """Hold the option when `name` is still coming (True: held)."""
        if name in self._exports or name not in self._waiting:
            return False
        self.state, self.waiting_for, self._held = State.WAITING, name, (option, data)
        return True

    def _unknown(self, name: str) -> str:
        if name in self._failed:
            return f"export {name!r} could not be opened (see the server's log)"
        return f"no export named {name!r}"

    def _run(self) -> None:
        while self.state is State.OPTIONS or self.state is State.CLIENT_FLAGS:
            step = self._client_flags if self.state is State.CLIENT_FLAGS else self._next_option
            if not step():
                return
        if self.state is State.TLS_START and self._buf:
            # The client must wait for the ACK before its TLS ClientHello.
            raise RemoteProtocolError("data after STARTTLS before its reply")
        if self.state is State.DONE:
            self.leftover = bytes(self._buf)
            self._buf.clear()

    def _client_flags(self) -> bool:
        """Consume the client's flags; False until all 4 bytes are here."""
        if len(self._buf) < 4:
            return False
        flags = decode_client_flags(self._buf)
        del self._buf[:4]
        if flags & ~int(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES):
            raise RemoteProtocolError(f"unknown client flags {flags:#x}")
        self.fixed_newstyle = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
        self.state = State.OPTIONS
        return True

    def _next_option(self) -> bool:
        """Consume one option (or skip an oversized one); False when more
        bytes are needed first."""
        if self._skip:
            n = min(self._skip, len(self._buf))
            del self._buf[:n]
            self._skip -= n
            return not self._skip
        if len(self._buf) < OPTION_HEADER_SIZE:
            return False
        option, length = decode_option_header(self._buf)
        if length > MAX_OPTION_LENGTH:
            del self._buf[:OPTION_HEADER_SIZE]
            if option == Opt.EXPORT_NAME:
                raise RemoteProtocolError("export name too long")
            self._skip = length
            self._reply(option, Rep.ERR_TOO_BIG, b"option payload too large")
            return True
        if len(self._buf) < OPTION_HEADER_SIZE + length:
            return False
        payload = bytes(self._buf[OPTION_HEADER_SIZE : OPTION_HEADER_SIZE + length])
        del self._buf[: OPTION_HEADER_SIZE + length]
        self._option(option, payload)
        return True

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake: negotiate afresh over it."""
        if self.state is not State.TLS_START:
            raise LocalProtocolError("TLS started, but no STARTTLS was answered")
        self.tls_active = True
        self.state = State.OPTIONS
        # Nothing negotiated in the clear carries over into TLS.
        self.structured = False
        self._meta_export = None
        self._meta = {}

    # --- options ----------------------------------------------------------

    def _reply(self, option: int, rep: int, data: bytes = b"") -> None:
        self._out.append(encode_option_reply(option, rep, data))

    def _error(self, option: int, rep: Rep, message: str) -> None:
        self._reply(option, rep, message.encode())

    def _option(self, option: int, data: bytes) -> None:
        if not self.fixed_newstyle and option != Opt.EXPORT_NAME:
            # Without fixed newstyle the client cannot parse an error reply.
            raise RemoteProtocolError("option other than EXPORT_NAME without fixed newstyle")
        if (self.tls is TlsMode.REQUIRE and not self.tls_active
                and option not in (Opt.STARTTLS, Opt.ABORT)):
            if option == Opt.EXPORT_NAME:  # no error reply exists for it
                raise RemoteProtocolError("EXPORT_NAME without TLS, which this server requires")
            self._error(option, Rep.ERR_TLS_REQD, "this server requires TLS (STARTTLS)")
            return
        handler = self._handlers.get(option)
        try:
            if handler is None:
                self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
            else:
                handler(self, option, data)
        except ValueError as e:
            self._error(option, Rep.ERR_INVALID, f"malformed option: {e}")

    def _abort(self, option: int, data: bytes) -> None:
        self._reply(option, Rep.ACK)
        self.state = State.CLOSED
        self.close_reason = "client aborted"

    def _structured_reply(self, option: int, data: bytes) -> None:
        if data:
            self._error(option, Rep.ERR_INVALID, "STRUCTURED_REPLY takes no data")
        else:
            self.structured = True
            self._reply(option, Rep.ACK)

    def _starttls(self, option: int, data: bytes) -> None:
        if self.tls is TlsMode.OFF:
            self._error(Opt.STARTTLS, Rep.ERR_POLICY, "TLS is not enabled on this server")
        elif self.tls_active:
            self._error(Opt.STARTTLS, Rep.ERR_INVALID, "TLS is already on")
        elif data:
            self._error(Opt.STARTTLS, Rep.ERR_INVALID, "STARTTLS takes no data")
        else:
            self._reply(Opt.STARTTLS, Rep.ACK)
            self.state = State.TLS_START

    def _export_name(self, option: int, data: bytes) -> None:
        try:
            name = data.decode()
        except UnicodeDecodeError as e:
            raise RemoteProtocolError("export name is not UTF-8") from e
        if self._wait(option, data, name):
            return
        export = self._exports.get(name)
        if export is None:
            # The legacy option has no error reply: the spec says close.
            raise RemoteProtocolError(self._unknown(name))
        flags = export.flags | TxFlag.HAS_FLAGS
        self._out.append(encode_export_name_reply(export.size, flags, self.no_zeroes))
        self._finish(export, flags)

    def _list(self, option: int, data: bytes) -> None:
        if data:
            self._error(Opt.LIST, Rep.ERR_INVALID, "LIST takes no data")
            return
        for export in self._exports.values():
            self._reply(Opt.LIST, Rep.SERVER, encode_list_reply(export.name, export.description))
        self._reply(Opt.LIST, Rep.ACK)

    def _read_name(self, cur: Cursor) -> str:
        n = cur.u32()
        if n > MAX_STRING:
            raise ValueError("export name too long")
        return cur.string(n)

    def _info_go(self, option: int, data: bytes) -> None:
        cur = Cursor(data)
        name = self._read_name(cur)
        requests = [cur.u16() for _ in range(cur.u16())]
        if not cur.at_end():
            raise ValueError("trailing bytes")
        if self._wait(option, data, name):
            return
        export = self._exports.get(name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, self._unknown(name))
            return
        flags = self._flags(export)
        self._reply(option, Rep.INFO, encode_info_export(export.size, flags))
        if Info.NAME in requests:
            self._reply(option, Rep.INFO, encode_info_name(export.name))
        if Info.DESCRIPTION in requests and export.description:
            self._reply(option, Rep.INFO, encode_info_description(export.description))
        # Always sent: clients that did not ask may still use it, and a
        # client that ignores it is served byte-granular anyway.
        self._reply(
            option,
            Rep.INFO,
            encode_info_block_size(export.min_block, export.pref_block, export.max_block),
        )
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._finish(export, flags)

    def _flags(self, export: ExportInfo) -> TxFlag:
        flags = export.flags | TxFlag.HAS_FLAGS
        if self.structured:
            # A single OFFSET_DATA chunk always satisfies DF.
            flags |= TxFlag.SEND_DF
        return flags

    def _finish(self, export: ExportInfo, flags: TxFlag) -> None:
        meta = self._meta if self._meta_export == export.name and self.structured else {}
        self.result = Negotiated(export, flags, self.structured, self.no_zeroes, dict(meta))
        self.state = State.DONE

    def _meta_context(self, option: int, data: bytes) -> None:
        if not self.structured:
            self._error(option, Rep.ERR_INVALID, "structured replies must be negotiated first")
            return
        cur = Cursor(data)
        name = self._read_name(cur)
        queries = [self._read_query(cur) for _ in range(cur.u32())]
        if not cur.at_end():
            raise ValueError("trailing bytes")
        if self._wait(option, data, name):
            return
        if name not in self._exports:
            self._error(option, Rep.ERR_UNKNOWN, self._unknown(name))
            return
        if option == Opt.SET_META_CONTEXT:
            self._meta_export = name
            self._meta = {}
        if not queries and option == Opt.LIST_META_CONTEXT:
            queries = ["base:"]
        for ctx, ctx_id in _matching(queries):
            if option == Opt.SET_META_CONTEXT:
                if ctx_id in self._meta:
                    continue
                self._meta[ctx_id] = ctx
            # LIST replies carry no id: the spec says 0.
            reply_id = ctx_id if option == Opt.SET_META_CONTEXT else 0
            self._reply(option, Rep.META_CONTEXT, encode_meta_context_reply(reply_id, ctx))
        self._reply(option, Rep.ACK)

    @staticmethod
    def _read_query(cur: Cursor) -> str:
        n = cur.u32()
        if n > MAX_STRING:
            raise ValueError("query too long")
        return cur.string(n)

    _handlers: ClassVar[dict[int, Callable[[Handshake, int, bytes], None]]] = {
        Opt.EXPORT_NAME: _export_name,
        Opt.ABORT: _abort,
        Opt.LIST: _list,
        Opt.STARTTLS: _starttls,
        Opt.INFO: _info_go,
        Opt.GO: _info_go,
        Opt.STRUCTURED_REPLY: _structured_reply,
        Opt.LIST_META_CONTEXT: _meta_context,
        Opt.SET_META_CONTEXT: _meta_context,
    }


def _matching(queries: list[str]) -> list[tuple[str, int]]:
    """The contexts we serve that the queries ask for ("base:" asks for all
    of the base namespace), in query order."""
    return [(ctx, ctx_id) for query in queries for ctx, ctx_id in META_CONTEXTS.items()
            if query == ctx or (query == "base:" and ctx.startswith("base:"))]
