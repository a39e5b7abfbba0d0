"""The handshake phase over a stand-in transport: the greeting, the end of
negotiation with the first request bytes, a client that gives up, and one
that takes too long. (STARTTLS runs over real sockets in test_tls.py.)"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

from nbdluks.block.file import FileDevice
from nbdluks.nbd.commands import Export
from nbdluks.nbd.constants import Opt
from nbdluks.nbd.handshake import Negotiated
from nbdluks.nbd.negotiation import Negotiation
from nbdluks.nbd.options import ServerOptions
from nbdluks.nbd.wire import encode_export_request, encode_option

CLIENT_FLAGS = struct.pack(">I", 3)


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.events.append(event)


class Transport:
    def __init__(self) -> None:
        self.sent = b""
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True


class Conn:
    """What negotiation needs of a connection."""

    def __init__(self) -> None:
        self.transport: Any = Transport()
        self.log = Log()
        self.result: tuple[Negotiated, bytes] | None = None

    def negotiated(self, result: Negotiated, leftover: bytes) -> None:
        self.result = (result, leftover)

    def connection_lost(self, exc: Exception | None) -> None:
        raise AssertionError("only a failed TLS handshake reports a loss")


def negotiate(tmp_path: Path, timeout: float, steps: list[bytes], wait: float) -> Conn:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    conn = Conn()

    async def main() -> None:
        dev = FileDevice(str(img))
        try:
            n = Negotiation(conn, asyncio.get_running_loop(), {"": Export("", dev)},
                            ServerOptions(handshake_timeout=timeout))
            n.start()
            assert conn.transport.sent[:16] == b"NBDMAGICIHAVEOPT"
            for data in steps:
                n.receive(data)
            await asyncio.sleep(wait)
        finally:
            dev.close()

    asyncio.run(main())
    return conn


def test_an_export_chosen_hands_over_the_first_request_bytes(tmp_path: Path) -> None:
    go = encode_option(Opt.GO, encode_export_request(""))
    conn = negotiate(tmp_path, 0.05, [CLIENT_FLAGS, go + b"first"], wait=0.1)
    assert conn.result is not None
    neg, leftover = conn.result
    assert neg.export.size == 1 << 20 and leftover == b"first"
    assert not conn.transport.closed  # the time limit ends with negotiation
    assert conn.log.events == []


def test_a_client_that_aborts_is_closed(tmp_path: Path) -> None:
    conn = negotiate(tmp_path, 10, [CLIENT_FLAGS, encode_option(Opt.ABORT)], wait=0)
    assert conn.transport.closed and conn.result is None
    assert conn.log.events == ["negotiation ended"]


def test_a_silent_client_is_closed_after_the_time_limit(tmp_path: Path) -> None:
    conn = negotiate(tmp_path, 0.05, [CLIENT_FLAGS], wait=0.1)
    assert conn.transport.closed and conn.result is None
    assert conn.log.events == ["negotiation timed out"]
