"""A Tang server's HTTP, as clevis's curl speaks it: an http or https URL
(one without a scheme is http), a POST to /rec (or, at binding, a GET of
/adv), no redirect followed. The answer is read by a small HTTP/1.1 parser
fed what arrives (`Answer`, sans I/O), with every part bounded in size.
Only `exchange` and `fetch` do I/O: the whole exchange (name lookup,
connect, TLS, send and every read) has one deadline.
"""

from __future__ import annotations

import ipaddress
import queue
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .jose import JoseError

# What a URL may hold: printable ASCII, no space (curl refuses the rest too).
_URL_TEXT = re.compile(r"[!-~]+")


@dataclass(frozen=True)
class Endpoint:
    """Where the recovery request goes: http or https only, as curl takes
    clevis's URL (no scheme is http); the target is the URL's path + /rec/kid."""

    tls: bool
    host: str  # a name or an address, IPv6 without its brackets
    port: int
    authority: str  # for the Host header
    target: str

    @classmethod
    def parse(cls, url: str, kid: str) -> Endpoint:
        return cls.at(url, f"/rec/{kid}")

    @classmethod
    def at(cls, url: str, suffix: str) -> Endpoint:
        """The endpoint whose target is the URL's path + `suffix` ("/adv/...")."""
        if not _URL_TEXT.fullmatch(url):
            raise JoseError("the URL is empty or holds a space, a control or a non-ASCII "
                            "character")
        full = url if "://" in url else f"http://{url}"
        try:
            parts = urllib.parse.urlsplit(full)
            port = parts.port
        except ValueError:
            raise JoseError("the URL is malformed (its host or port)") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise JoseError(f"URL scheme {parts.scheme[:20]!r} is not http or https")
        if "@" in parts.netloc:
            raise JoseError("the URL holds credentials")
        if not parts.hostname:
            raise JoseError("the URL has no host")
        if "?" in full or "#" in full:
            raise JoseError("the URL has a query or a fragment")
        tls = scheme == "https"
        return cls(tls, parts.hostname, port or (443 if tls else 80), parts.netloc,
                   f"{parts.path.rstrip('/')}{suffix}")

    def request(self, body: bytes) -> bytes:
        """The HTTP/1.1 POST of `body` (the blinded key)."""
        head = (f"POST {self.target} HTTP/1.1\r\nHost: {self.authority}\r\n"
                "Content-Type: application/jwk+json\r\nAccept: application/jwk+json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        return head.encode("ascii") + body

    def get(self) -> bytes:
        """The HTTP/1.1 GET of the target (an advertisement, a JWS)."""
        return (f"GET {self.target} HTTP/1.1\r\nHost: {self.authority}\r\n"
                "Accept: application/jose+json\r\nConnection: close\r\n\r\n").encode("ascii")


# An answer is a JWK of a few hundred bytes, or an advertisement of a few KiB:
# bounds far above that.
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
MAX_RAW = 1024 * 1024  # all bytes read, chunk framing included
_STATUS = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([\t -~]*))?")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,8}")


class HttpStatusError(JoseError):
    """The server answered with a status other than 2xx: `status` says which."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Answer:
    """The server's HTTP/1.1 response, sans I/O: `feed` what arrives until it
    says the answer is complete, or call `end` when the server closes; then
    `body` is the JWK. Anything but a 2xx status is refused, a redirect too."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._raw = 0
        self._framing: str | None = None  # "length", "chunked" or "close", once the head is read
        self._length = 0
        self.body = bytearray()
        self.complete = False

    def feed(self, data: bytes) -> bool:
        self._raw += len(data)
        if self._raw > MAX_RAW:
            raise JoseError(f"the answer is larger than {MAX_RAW // 1024} KiB")
        self._buf += data
        if self._framing is None and not self._head():
            return False
        if self._framing == "length" and len(self._buf) >= self._length:
            self.body = self._buf[: self._length]
            self.complete = True
        elif self._framing == "chunked":
            self.complete = self._chunks()
        elif self._framing == "close" and len(self._buf) > MAX_BODY:
            raise JoseError(f"the answer is larger than {MAX_BODY // 1024} KiB")
        return self.complete

    def end(self) -> None:
        """The server closed the connection."""
        if self._framing == "close":
            self.body, self.complete = self._buf, True
        elif not self.complete:
            raise JoseError("the server closed the connection without answering"
                            if self._raw == 0 else "the answer is truncated")

    def _head(self) -> bool:
        while True:
            if not b"HTTP/".startswith(bytes(self._buf[:5])):
                raise JoseError("the answer is not HTTP")
            end = self._buf.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if max(end, len(self._buf)) > MAX_HEAD:
                    raise JoseError(f"the answer's head is larger than {MAX_HEAD // 1024} KiB")
                return False
            lines = bytes(self._buf[:end]).split(b"\r\n")
            del self._buf[: end + 4]
            status = _STATUS.fullmatch(lines[0])
            if status is None:
                raise JoseError("the answer's status line is not HTTP/1.x")
            code = int(status[1])
            if 100 <= code < 200:  # an interim answer: the real one follows
                continue
            if not 200 <= code < 300:
                reason = (status[2] or b"").decode("ascii", "replace").strip()[:60]
                raise HttpStatusError(
                    f"HTTP {code} {reason}".rstrip()
                    + (": redirects are not followed" if 300 <= code < 400 else ""), code)
            self._framing = self._headers(lines[1:])
            return True

    def _headers(self, lines: list[bytes]) -> str:
        length: int | None = None
        chunked = False
        for line in lines:
            name, colon, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if not colon or not name:
                raise JoseError("the answer has a malformed header line")
            if name == b"transfer-encoding":
                if value.lower() != b"chunked":
                    raise JoseError("the answer's transfer encoding is not supported")
                chunked = True
            elif name == b"content-length":
                if not value.isdigit() or len(value) > 12 \
                        or length not in (None, int(value)):
                    raise JoseError("the answer has a malformed Content-Length")
                length = int(value)
        if chunked:
            return "chunked"
        if length is None:
            return "close"
        if length > MAX_BODY:
            raise JoseError(f"the answer is larger than {MAX_BODY // 1024} KiB")
        self._length = length
        return "length"

    def _chunks(self) -> bool:
        """Move whole chunks from the buffer to the body: True at the last one."""
        while True:
            line_end = self._buf.find(b"\r\n")
            if line_end < 0:
                if len(self._buf) > 1024:
                    raise JoseError("the answer's chunked body is malformed")
                return False
            size_text = bytes(self._buf[:line_end]).split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_text):
                raise JoseError("the answer's chunked body is malformed")
            size = int(size_text, 16)
            if size == 0:
                return True  # (trailers, if any, are not needed)
            if len(self.body) + size > MAX_BODY:
                raise JoseError(f"the answer is larger than {MAX_BODY // 1024} KiB")
            start = line_end + 2
            if len(self._buf) < start + size + 2:
                return False
            if self._buf[start + size: start + size + 2] != b"\r\n":
                raise JoseError("the answer's chunked body is malformed")
            self.body += self._buf[start: start + size]
            del self._buf[: start + size + 2]


def exchange(endpoint: Endpoint, body: bytes, timeout: float) -> bytes:
    """POST `body`, read the answer: all of it within `timeout` seconds."""
    return _round_trip(endpoint, endpoint.request(body), timeout)


def fetch(endpoint: Endpoint, timeout: float) -> bytes:
    """GET the target, read the answer: all of it within `timeout` seconds."""
    return _round_trip(endpoint, endpoint.get(), timeout)


def _round_trip(endpoint: Endpoint, request: bytes, timeout: float) -> bytes:
    conn = Connection(endpoint, time.monotonic() + timeout)
    try:
        conn.send(request)
        answer = Answer()
        while not answer.complete:
            data = conn.recv()
            if not data:
                answer.end()
            else:
                answer.feed(data)
        return bytes(answer.body)
    finally:
        conn.close()


class Connection:
    """A TCP connection (TLS over memory buffers for https) whose every
    operation waits only for what is left until `deadline`."""

    def __init__(self, endpoint: Endpoint, deadline: float) -> None:
        self.deadline = deadline
        self.sock = self._connect(endpoint)
        self.tls: ssl.SSLObject | None = None
        if endpoint.tls:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            try:
                self.tls = ssl.create_default_context().wrap_bio(
                    self._in, self._out, server_hostname=endpoint.host)
                self._tls(self.tls.do_handshake)
            except BaseException:
                self.sock.close()
                raise

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def _connect(self, endpoint: Endpoint) -> socket.socket:
        error: OSError = OSError("no address")
        for family, kind, proto, _, addr in self._resolve(endpoint):
            left = self.left()
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(addr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error

    def _resolve(self, endpoint: Endpoint) -> list[Any]:
        """The addresses of the host; a name is looked up aside, and given up
        on at the deadline (the resolver has its own, longer timeouts)."""
        def lookup() -> list[Any]:
            return socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)

        try:
            ipaddress.ip_address(endpoint.host)
        except ValueError:
            pass
        else:
            return lookup()
        found: queue.SimpleQueue[list[Any] | BaseException] = queue.SimpleQueue()

        def run() -> None:
            try:
                found.put(lookup())
            except BaseException as e:  # handed over to the waiting side
                found.put(e)

        threading.Thread(target=run, name="clevis-dns", daemon=True).start()
        try:
            answer = found.get(timeout=self.left())
        except queue.Empty:
            raise TimeoutError from None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _tls(self, step: Callable[[], Any]) -> Any:
        """Run a TLS step, carrying its records over the socket until it is done."""
        while True:
            try:
                out = step()
            except ssl.SSLWantReadError:
                self._sendall(self._out.read())
                data = self._recv_raw()
                if data:
                    self._in.write(data)
                else:
                    self._in.write_eof()
                continue
            self._sendall(self._out.read())
            return out

    def send(self, data: bytes) -> None:
        tls = self.tls
        if tls is None:
            self._sendall(data)
        else:
            self._tls(lambda: tls.write(data))

    def recv(self) -> bytes:
        tls = self.tls
        if tls is None:
            return self._recv_raw()
        try:
            return bytes(self._tls(lambda: tls.read(16384)))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    def _sendall(self, data: bytes) -> None:
        if data:
            self.sock.settimeout(self.left())
            self.sock.sendall(data)

    def _recv_raw(self) -> bytes:
        self.sock.settimeout(self.left())
        return self.sock.recv(16384)

    def close(self) -> None:
        self.sock.close()
