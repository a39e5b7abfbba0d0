"""The upstream client's byte stream: a plain socket, or TLS over one.

The client has one reader thread and serialized writers. An ssl.SSLSocket
may not be read and written from two threads at once (OpenSSL forbids
concurrent use of one SSL object; a TLS 1.3 read can write), so TLS runs on
an SSLObject over memory BIOs: every call into it holds a lock, and the
socket I/O happens outside that lock.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Protocol

_RECV = 256 * 1024


class Channel(Protocol):
    def sendall(self, *bufs: bytes | bytearray | memoryview) -> None: ...
    def recv_into(self, view: memoryview) -> int: ...  # 0: end of stream
    def shutdown(self) -> None: ...
    def close(self) -> None: ...


class PlainChannel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def sendall(self, *bufs: bytes | bytearray | memoryview) -> None:
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            sent = self.sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


class TlsChannel:
    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, hostname: str) -> None:
        """TLS handshake as the client (blocking, with the socket's timeout)."""
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=False,
                                 server_hostname=hostname)
        self._lock = threading.Lock()
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = sock.recv(_RECV)
                if not data:
                    raise ConnectionError(
                        "the server closed the connection during TLS setup") from None
                self._in.write(data)
        self._flush()

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def sendall(self, *bufs: bytes | bytearray | memoryview) -> None:
        # Writers are serialized by the caller; the lock keeps the reader out
        # of the SSL object meanwhile.
        with self._lock:
            for b in bufs:
                self._obj.write(b)
            data = self._out.read()  # also what a read left to send (TLS 1.3)
        self.sock.sendall(data)

    def recv_into(self, view: memoryview) -> int:
        while True:
            with self._lock:
                try:
                    # With a buffer, read() fills it and returns a count.
                    n: int = self._obj.read(len(view), view)  # type: ignore[assignment]
                    return n
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return 0
            data = self.sock.recv(_RECV)
            if not data:
                return 0
            with self._lock:
                self._in.write(data)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()
