"""The handshake phase of one connection: feeds the client's bytes to the
sans-IO Handshake and writes its replies, upgrades the transport to TLS on
STARTTLS, and closes a connection that takes too long to choose an export
(ServerOptions.handshake_timeout, TLS handshake and the wait for an export
still being unlocked included)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .commands import Export
from .exports import Exports
from .handshake import Handshake, Negotiated, State
from .options import ServerOptions
from .tls import subject_cn


class Endpoint(Protocol):
    """What negotiation needs of its connection."""

    transport: asyncio.Transport | None  # replaced by the TLS one on STARTTLS
    log: Any  # the connection's bound structlog logger

    def negotiated(self, result: Negotiated, leftover: bytes) -> None:
        """An export is chosen; `leftover` is the start of the request stream."""

    def connection_lost(self, exc: Exception | None) -> None: ...


class Negotiation:
    def __init__(self, conn: Endpoint, loop: asyncio.AbstractEventLoop,
                 exports: Mapping[str, Export], options: ServerOptions) -> None:
        self._conn = conn
        self._loop = loop
        self._options = options
        if isinstance(exports, Exports):
            self._exports: Exports | None = exports
            self.handshake = Handshake(exports.infos(), options.tls, exports.pending,
                                       exports.failed)
        else:
            self._exports = None
            self.handshake = Handshake({n: e.info() for n, e in exports.items()}, options.tls)
        self._timer: asyncio.TimerHandle | None = None
        self._stop_waiting: Callable[[], None] | None = None
        self._tls_task: asyncio.Task[None] | None = None

    @property
    def tls_active(self) -> bool:
        return self.handshake.tls_active

    def start(self) -> None:
        """Greet the client; the time limit runs from now."""
        assert self._conn.transport is not None
        self._conn.transport.write(self.handshake.data_to_send())
        self._timer = self._loop.call_later(self._options.handshake_timeout, self._timed_out)

    def cancel_timer(self) -> None:
        """Negotiation is over: no time limit, no waiting for an export."""
        if self._timer:
            self._timer.cancel()
        if self._stop_waiting is not None:
            self._stop_waiting()
            self._stop_waiting = None

    def receive(self, data: bytes) -> None:
        self.handshake.receive_data(data)
        self._answer()

    def _resume(self) -> None:
        """The export waited for is settled (on the loop)."""
        self._stop_waiting = None
        t = self._conn.transport
        if t is None or t.is_closing():
            return
        t.resume_reading()
        self.handshake.resume()
        self._answer()

    def _answer(self) -> None:
        t = self._conn.transport
        assert t is not None
        hs = self.handshake
        out = hs.data_to_send()
        if out:
            t.write(out)
        if hs.state is State.CLOSED:
            self._conn.log.debug("negotiation ended", reason=hs.close_reason)
            t.close()
        elif hs.state is State.TLS_START:
            # Not one more byte for the option parser: the next ones are TLS.
            t.pause_reading()
            self._tls_task = self._loop.create_task(self._start_tls())
        elif hs.state is State.WAITING:
            # Nothing more is read meanwhile; the time limit still runs.
            assert self._exports is not None and hs.waiting_for is not None
            t.pause_reading()
            self._conn.log.debug("waiting for the export", export=hs.waiting_for)
            self._stop_waiting = self._exports.wait(hs.waiting_for, self._resume)
        elif hs.state is State.DONE:
            assert hs.result is not None
            self.cancel_timer()
            self._conn.negotiated(hs.result, hs.leftover)

    async def _start_tls(self) -> None:
        creds = self._options.credentials
        plain = self._conn.transport
        assert plain is not None and creds is not None
        ctx = creds.context
        try:
            tls = await self._loop.start_tls(
                plain, plain.get_protocol(), ctx, server_side=True,  # to the connection
                ssl_handshake_timeout=self._options.handshake_timeout,
            )
        except Exception as e:  # whatever broke, only this connection ends
            self._conn.log.warning("TLS handshake failed", error=str(e) or type(e).__name__)
            plain.abort()
            # The TLS layer had taken the transport over, and does not report
            # the loss of a connection it never handed on.
            self._conn.connection_lost(None)
            return
        if tls is None:  # closed meanwhile
            return
        if tls.is_closing():  # uvloop hands back a dead transport when the time
            self._conn.log.warning("TLS handshake failed", error="closed")  # limit hit
            plain.abort()
            self._conn.connection_lost(None)
            return
        self._conn.transport = tls
        obj = tls.get_extra_info("ssl_object")
        peer = obj.getpeercert() if obj else None  # set when client certificates are checked
        self._conn.log.info("TLS started", version=obj.version() if obj else None,
                            cipher=obj.cipher()[0] if obj and obj.cipher() else None,
                            client=subject_cn(peer) if peer else None)
        self.handshake.tls_started()

    def _timed_out(self) -> None:
        t = self._conn.transport
        if self.handshake.result is None and t is not None:
            self._conn.log.warning("negotiation timed out",
                                   waiting_for=self.handshake.waiting_for)
            t.close()
