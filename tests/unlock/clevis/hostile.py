"""Test parts for the clevis pins: JWEs made as clevis makes them (tang and
sss, with a key the test knows), a correct Tang server, and raw TCP servers
that answer whatever a test wants (a hostile Tang)."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import socket
import socketserver
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.x509.oid import NameOID
from ecdsa import curves, ellipticcurve

P = (1 << 255) - 19  # a prime of 32 bytes, as clevis's sss p for A256GCM


def b64e(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    n = key.public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": b64e(n.x.to_bytes(32, "big")),
            "y": b64e(n.y.to_bytes(32, "big"))}


def thumbprint(key: dict[str, str]) -> str:
    import hashlib

    members = {k: key[k] for k in ("crv", "kty", "x", "y")}
    text = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return b64e(hashlib.sha256(text.encode()).digest())


def seal(header: dict[str, Any], key: bytes, plain: bytes) -> str:
    """A compact JWE of `plain` under `header` (A*GCM with `key`)."""
    protected = b64e(json.dumps(header).encode())
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, plain, protected.encode())
    return ".".join([protected, "", b64e(iv), b64e(sealed[:-16]), b64e(sealed[-16:])])


def deflate(data: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return co.compress(data) + co.flush()


def tang_jwe(url: str, plain: bytes, server: ec.EllipticCurvePrivateKey, *,
             zip_data: bytes | None = None, drop: str | None = None) -> str:
    """What `clevis encrypt tang` makes: an ECDH-ES key agreed with the
    server's key. `zip_data` replaces the plaintext with data said to be
    DEFLATEd; `drop` removes a header member after the key was derived."""
    s_jwk = {**jwk(server.public_key()), "alg": "ECMR", "key_ops": ["deriveKey"]}
    client = ec.generate_private_key(ec.SECP256R1())
    z = client.exchange(ec.ECDH(), server.public_key())
    info = b"".join(len(x).to_bytes(4, "big") + x for x in (b"A256GCM", b"", b""))
    cek = ConcatKDFHash(hashes.SHA256(), 32, info + (256).to_bytes(4, "big")).derive(z)
    hdr: dict[str, Any] = {
        "alg": "ECDH-ES", "enc": "A256GCM", "kid": thumbprint(s_jwk),
        "epk": jwk(client.public_key()),
        "clevis": {"pin": "tang", "tang": {"url": url, "adv": {"keys": [s_jwk]}}}}
    if zip_data is not None:
        hdr["zip"] = "DEF"
        plain = zip_data
    if drop:
        del hdr[drop]
    return seal(hdr, cek, plain)


def shares(t: int, n: int, secret: int) -> list[bytes]:
    coeffs = [secret] + [secrets.randbelow(P) for _ in range(t - 1)]
    return [x.to_bytes(32, "big")
            + (sum(c * pow(x, i, P) for i, c in enumerate(coeffs)) % P).to_bytes(32, "big")
            for x in range(1, n + 1)]


def sss_jwe(t: int, pins: list[Callable[[bytes], str]], plain: bytes) -> str:
    """What `clevis encrypt sss` makes: each nested pin holds one share."""
    secret = secrets.randbelow(P)
    nested = [make(pt) for make, pt in zip(pins, shares(t, len(pins), secret), strict=True)]
    return sss_raw({"t": t, "p": b64e(P.to_bytes(32, "big")), "jwe": nested},
                   secret.to_bytes(32, "big"), plain)


def sss_raw(cfg: dict[str, Any], key: bytes, plain: bytes) -> str:
    hdr = {"alg": "dir", "enc": "A256GCM", "clevis": {"pin": "sss", "sss": cfg}}
    return seal(hdr, key, plain)


class FakeTang(BaseHTTPRequestHandler):
    """A correct Tang server's recovery (s times the point it is sent)."""

    key: ec.EllipticCurvePrivateKey
    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        self.send_error(405)

    def do_POST(self) -> None:
        type(self).requests += 1
        got = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        point = ellipticcurve.Point(curves.NIST256p.curve, int.from_bytes(b64d(got["x"]), "big"),
                                    int.from_bytes(b64d(got["y"]), "big"))
        p = point * self.key.private_numbers().private_value
        body = json.dumps({"kty": "EC", "crv": "P-256", "x": b64e(p.x().to_bytes(32, "big")),
                           "y": b64e(p.y().to_bytes(32, "big"))}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/jwk+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def fake_tang(wrap: Callable[[socket.socket], socket.socket] | None = None
              ) -> Iterator[tuple[ThreadingHTTPServer, type[FakeTang]]]:
    handler = type("Tang", (FakeTang,), {"key": ec.generate_private_key(ec.SECP256R1()),
                                         "requests": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if wrap is not None:
        server.socket = wrap(server.socket)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server, handler
    finally:
        server.shutdown()
        server.server_close()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nbdluks test tang")])
    now = datetime.datetime.now(datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "tang.crt", tmp / "tang.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def read_request(sock: socket.socket) -> bytes:
    """One HTTP request, head and body (so that closing sends no reset)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return data


class Raw(socketserver.ThreadingTCPServer):
    """A TCP server running `answer(sock, stop)` for each connection."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer: Callable[[socket.socket, threading.Event], None]) -> None:
        self.answer = answer
        self.stop = threading.Event()
        self.connections = 0
        super().__init__(("127.0.0.1", 0), _RawHandler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


class _RawHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, Raw)
        server.connections += 1
        with contextlib.suppress(OSError):
            server.answer(self.request, server.stop)
