"""A blocking NBD client for upstream exports, safe to share between threads.

Negotiation uses the same codec as the server (fixed newstyle, STARTTLS
for nbds URIs, structured replies, GO with block-size info). Requests from
many threads are pipelined on one connection; a reader thread routes each
reply to its waiter by handle and writes read data straight into the
waiter's buffer. When the connection dies or a request times out, every
waiter and every later request gets EIO: never wrong data.
"""

from __future__ import annotations

import errno
import itertools
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NbdluksError
from .channel import Channel, PlainChannel, TlsChannel
from .constants import (
    CHUNK_HEADER_SIZE,
    GREETING_SIZE,
    MAX_PAYLOAD,
    OPTION_REPLY_HEADER_SIZE,
    SIMPLE_REPLY_SIZE,
    Chunk,
    Cmd,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TxFlag,
)
from .tls import TlsConfigError, client_context
from .uri import NbdUri
from .wire import (
    ChunkHeader,
    ProtocolError,
    RemoteProtocolError,
    decode_error_chunk,
    decode_greeting,
    decode_info,
    decode_offset,
    decode_offset_hole,
    decode_option_reply_header,
    decode_reply_header,
    encode_client_flags,
    encode_export_request,
    encode_option,
    encode_request,
    reply_header_size,
)


class NbdClientError(NbdluksError):
    """Connecting or negotiating failed (a one-line reason)."""


class NegotiationRefused(NbdClientError):
    """The server answered an option with an error."""

    def __init__(self, what: str, reply: int, message: bytes) -> None:
        name = Rep(reply).name if reply in Rep._value2member_map_ else hex(reply)
        super().__init__(f"{what}: {name} {message.decode('utf-8', 'replace')}".strip())
        self.reply = reply


class UpstreamLost(OSError):
    """EIO because the connection died (or timed out), not because the
    upstream answered with an error: the request may be retried elsewhere."""

    sent = True  # the request may have reached the upstream


class UpstreamDown(UpstreamLost):
    """The connection was dead already: the request was never sent."""

    sent = False


@dataclass
class _Pending:
    cmd: int
    offset: int
    buf: memoryview | None  # READ: where the data goes
    done: threading.Event = field(default_factory=threading.Event)
    error: int = 0
    message: str = ""
    lost: bool = False  # failed with the connection, not by the upstream
    # READ in chunks: the (start, length) ranges the reply covered so far.
    covered: list[tuple[int, int]] = field(default_factory=list)

    def check_covered(self) -> None:
        """A structured READ reply must cover every byte exactly once (the
        buffer is reused: a gap would pass on stale bytes)."""
        assert self.buf is not None
        pos = 0
        for start, n in sorted(self.covered):
            if start != pos:
                break
            pos += n
        if pos != len(self.buf):
            self.error = errno.EIO
            self.message = "the upstream's read reply did not cover the request"


def _recv_into(chan: Channel, view: memoryview) -> None:
    while view:
        n = chan.recv_into(view)
        if n == 0:
            raise ConnectionError("upstream closed the connection")
        view = view[n:]


def _recv(chan: Channel, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(chan, memoryview(buf))
    return bytes(buf)


class NbdClient:
    def __init__(self, uri: NbdUri, *, connect_timeout: float, request_timeout: float,
                 on_lost: Callable[[NbdClient], object] | None = None) -> None:
        self.uri = uri
        self._on_lost = on_lost  # told once when the connection dies, unless closed
        self._closing = False
        self.request_timeout = request_timeout
        try:
            if uri.socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(connect_timeout)
                sock.connect(uri.socket)
            else:
                sock = socket.create_connection((uri.host, uri.port), timeout=connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise NbdClientError(f"cannot connect to {uri}: {e.strerror or e}") from None
        self.sock = sock
        self.chan: Channel = PlainChannel(sock)
        try:
            self._negotiate()
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise NbdClientError(f"{uri}: TLS: the server's certificate is not trusted: "
                                 f"{e.verify_message}") from None
        except ssl.SSLError as e:
            sock.close()
            raise NbdClientError(f"{uri}: TLS failed: {e.reason or e}") from None
        except TlsConfigError as e:
            sock.close()
            raise NbdClientError(f"{uri}: {e}") from None
        except (OSError, ProtocolError, NegotiationRefused) as e:
            why = self._tls_alert() or str(e)
            sock.close()
            raise NbdClientError(f"{uri}: negotiation failed: {why}") from None
        sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._handles = itertools.count(1)
        self._dead: str | None = None
        self._reader = threading.Thread(target=self._read_loop, name="nbd-upstream", daemon=True)
        self._reader.start()

    # --- negotiation ------------------------------------------------------

    def _negotiate(self) -> None:
        flags = decode_greeting(_recv(self.chan, GREETING_SIZE))
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise RemoteProtocolError("server does not support fixed newstyle negotiation")
        client = HandshakeFlag.FIXED_NEWSTYLE | (flags & HandshakeFlag.NO_ZEROES)
        self.chan.sendall(encode_client_flags(client))
        if self.uri.tls:
            self._starttls()
        self.chan.sendall(encode_option(Opt.STRUCTURED_REPLY))
        rep, _ = self._option_reply(Opt.STRUCTURED_REPLY)
        self.structured = rep == Rep.ACK
        self.chan.sendall(
            encode_option(Opt.GO, encode_export_request(self.uri.export, (Info.BLOCK_SIZE,)))
        )
        self.size = -1
        self.flags = TxFlag(0)
        self.min_block, self.pref_block, self.max_block = 1, 4096, MAX_PAYLOAD
        while True:
            rep, data = self._option_reply(Opt.GO)
            if rep == Rep.ACK:
                break
            if rep == Rep.INFO:
                kind, fields = decode_info(data)
                if kind == Info.EXPORT:
                    self.size, self.flags = fields[0], TxFlag(fields[1])
                elif kind == Info.BLOCK_SIZE:
                    self.min_block, self.pref_block, self.max_block = fields
            elif rep & 0x80000000:
                raise NegotiationRefused(f"export {self.uri.export!r} refused", rep, data)
        if self.size < 0:
            raise RemoteProtocolError("server sent no export information")
        self.max_block = min(self.max_block or MAX_PAYLOAD, MAX_PAYLOAD)

    def _tls_alert(self) -> str | None:
        """After TLS, a server that rejects us (say, for want of a client
        certificate) may send an alert or just hang up: say which."""
        if not isinstance(self.chan, TlsChannel):
            return None
        try:
            self.sock.settimeout(1.0)
            self.chan.recv_into(memoryview(bytearray(1)))
        except ssl.SSLError as e:
            return f"TLS: the server refused the connection ({e.reason or e})"
        except OSError:
            pass
        certs = self.uri.tls_certificates
        if certs and (Path(certs) / "client-cert.pem").is_file():
            return "the server hung up after the TLS handshake"
        return ("the server hung up after the TLS handshake: does it want a client "
                "certificate? (client-cert.pem and client-key.pem in tls-certificates)")

    def _starttls(self) -> None:
        self.chan.sendall(encode_option(Opt.STARTTLS))
        rep, data = self._option_reply(Opt.STARTTLS)
        if rep != Rep.ACK:
            raise NegotiationRefused("the server refused TLS", rep, data)
        ctx = client_context(self.uri.tls_certificates, self.uri.tls_verify)
        self.chan = TlsChannel(self.sock, ctx,
                               self.uri.tls_hostname or self.uri.host or "localhost")

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        opt, rep, length = decode_option_reply_header(_recv(self.chan, OPTION_REPLY_HEADER_SIZE))
        if opt != option:
            raise RemoteProtocolError(f"reply for option {opt}, expected {option}")
        if length > 1 << 20:
            raise RemoteProtocolError("option reply too large")
        return rep, _recv(self.chan, length)

    # --- transmission -----------------------------------------------------

    def request(self, cmd: int, offset: int, length: int, *, flags: int = 0,
                data: bytes | bytearray | memoryview | None = None,
                buf: memoryview | None = None) -> None:
        """Send one request and wait for its reply; OSError(errno) on failure."""
        p = _Pending(cmd, offset, buf)
        with self._lock:
            if self._dead:
                raise UpstreamDown(errno.EIO, f"upstream {self.uri}: {self._dead}")
            handle = next(self._handles)
            self._pending[handle] = p
        try:
            with self._send_lock:
                header = encode_request(flags, cmd, handle, offset, length)
                if data is None:
                    self.chan.sendall(header)
                else:
                    self.chan.sendall(header, data)
        except OSError as e:
            self._fail(f"send failed: {e.strerror or e}")
        if not p.done.wait(self.request_timeout):
            self._fail(f"no reply within {self.request_timeout:.0f} s")
        if p.lost:
            raise UpstreamLost(errno.EIO, p.message)
        if p.error:
            raise OSError(p.error, p.message or f"upstream error {p.error}")

    def _fail(self, reason: str) -> None:
        """Mark the connection dead and fail every waiter with EIO."""
        with self._lock:
            first = self._dead is None
            if first:
                self._dead = reason
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            p.error = errno.EIO
            p.lost = True
            p.message = f"upstream {self.uri}: {self._dead}"
            p.done.set()
        self.chan.shutdown()
        if first and not self._closing and self._on_lost is not None:
            self._on_lost(self)

    def _read_loop(self) -> None:
        try:
            while True:
                self._read_reply()
        except (OSError, ProtocolError) as e:
            self._fail(str(e) or type(e).__name__)

    def _read_reply(self) -> None:
        head = bytearray(CHUNK_HEADER_SIZE)
        view = memoryview(head)
        _recv_into(self.chan, view[:SIMPLE_REPLY_SIZE])
        size = reply_header_size(view[:4])
        _recv_into(self.chan, view[SIMPLE_REPLY_SIZE:size])  # a chunk: 4 more bytes
        hdr = decode_reply_header(view[:size])
        with self._lock:
            p = self._pending.get(hdr.handle)
        if p is None:
            raise RemoteProtocolError(f"reply for unknown handle {hdr.handle}")
        if not isinstance(hdr, ChunkHeader):
            if hdr.error:
                p.error = hdr.error
            elif p.cmd == Cmd.READ:
                assert p.buf is not None
                _recv_into(self.chan, p.buf)
            self._complete(hdr.handle, p)
            return
        self._chunk(hdr, p)
        if hdr.done:
            if p.cmd == Cmd.READ and not p.error:
                p.check_covered()
            self._complete(hdr.handle, p)

    def _chunk(self, hdr: ChunkHeader, p: _Pending) -> None:
        if hdr.type == Chunk.OFFSET_DATA:
            offset = decode_offset(_recv(self.chan, 8))
            n = hdr.length - 8
            start = offset - p.offset
            if p.buf is None or start < 0 or n < 0 or start + n > len(p.buf):
                raise RemoteProtocolError("data chunk outside the request")
            _recv_into(self.chan, p.buf[start : start + n])
            p.covered.append((start, n))
        elif hdr.type == Chunk.OFFSET_HOLE:
            offset, n = decode_offset_hole(_recv(self.chan, 12))
            start = offset - p.offset
            if p.buf is None or start < 0 or start + n > len(p.buf):
                raise RemoteProtocolError("hole chunk outside the request")
            p.buf[start : start + n] = bytes(n)
            p.covered.append((start, n))
        elif hdr.type in (Chunk.ERROR, Chunk.ERROR_OFFSET):
            err, p.message = decode_error_chunk(_recv(self.chan, hdr.length))
            p.error = err or errno.EIO
        else:  # NONE, BLOCK_STATUS or unknown: skip the payload
            _recv(self.chan, hdr.length)

    def _complete(self, handle: int, p: _Pending) -> None:
        with self._lock:
            self._pending.pop(handle, None)
        p.done.set()

    def close(self) -> None:
        with self._lock:
            alive = self._dead is None
            self._closing = True
        if alive:
            try:
                with self._send_lock:
                    self.chan.sendall(encode_request(0, Cmd.DISC, 0, 0, 0))
            except OSError:
                pass
        self._fail("closed")
        self.chan.close()
        self._reader.join(timeout=5)
