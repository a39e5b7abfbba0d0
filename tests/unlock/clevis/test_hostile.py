"""Hostile Tang servers and tokens: each ends in a one-line PinError that
names the pin and its URL -- never another exception, never a wait past the
deadline, never unbounded memory or threads."""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from nbdluks.unlock.clevis import pins
from nbdluks.unlock.clevis.pins import PinError

from .hostile import (
    Raw,
    b64e,
    deflate,
    fake_tang,
    read_request,
    self_signed,
    sss_jwe,
    sss_raw,
    tang_jwe,
)

KEY = ec.generate_private_key(ec.SECP256R1())  # a Tang key no server here holds
Answer = Callable[[socket.socket, threading.Event], None]


@pytest.fixture
def raw() -> Iterator[Callable[[Answer], Raw]]:
    servers: list[Raw] = []

    def start(answer: Answer) -> Raw:
        servers.append(Raw(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def tang() -> Iterator[tuple[str, ec.EllipticCurvePrivateKey, type]]:
    with fake_tang() as (server, handler):
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.key, handler


def replying(data: bytes) -> Answer:
    def answer(sock: socket.socket, stop: threading.Event) -> None:
        read_request(sock)
        sock.sendall(data)
    return answer


def refusal(jwe: str, timeout: float = 10, longest: int = 400) -> str:
    with pytest.raises(PinError) as e:
        pins.decrypt(jwe, timeout)
    message = str(e.value)
    assert "\n" not in message and len(message) < longest, message
    return message


@pytest.mark.parametrize(("reply", "reason"), [
    (b"GARBAGE\r\n", "the answer is not HTTP"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
     "the answer's chunked body is malformed"),
    (b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n{"kty": "EC"',
     "the answer is truncated"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "the answer is truncated"),
    (b"", "the server closed the connection without answering"),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "HTTP 500 Oops"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "larger than 64 KiB"),
    (b"HTTP/1.0 200 OK\r\n\r\n" + b"[" * 60000, "answer is not JSON"),
], ids=["garbage", "bad-chunk", "cut-chunk", "cut-length", "nothing", "500", "huge",
        "deep-json"])
def test_a_hostile_answer_is_a_clean_refusal(raw: Callable[[Answer], Raw], reply: bytes,
                                             reason: str) -> None:
    server = raw(replying(reply))
    message = refusal(tang_jwe(server.url, b"x", KEY))
    assert message.startswith(f"tang {server.url}: ") and reason in message, message


def test_a_redirect_is_a_failure_not_followed(raw: Callable[[Answer], Raw],
                                              tang: tuple[str, ec.EllipticCurvePrivateKey, type]
                                              ) -> None:
    url, key, handler = tang
    hostile = raw(replying(f"HTTP/1.1 302 Found\r\nLocation: {url}/rec/x\r\n"
                           "Content-Length: 0\r\n\r\n".encode()))
    message = refusal(tang_jwe(hostile.url, b"x", key))
    assert message == f"tang {hostile.url}: HTTP 302 Found: redirects are not followed"
    assert handler.requests == 0


def dripping(sock: socket.socket, stop: threading.Event) -> None:
    """A header that never ends, one byte every half second."""
    read_request(sock)
    for byte in itertools.chain(b"HTTP/1.1 200 OK\r\nX-Drip: ", itertools.repeat(ord("a"))):
        sock.sendall(bytes([byte]))
        if stop.wait(0.5):
            return


def test_a_slow_drip_is_cut_at_the_deadline(raw: Callable[[Answer], Raw]) -> None:
    server = raw(dripping)
    outcome: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            pins.decrypt(tang_jwe(server.url, b"x", KEY), 2)
        except Exception as e:
            outcome["error"] = e
        outcome["took"] = time.monotonic() - started

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "still reading the drip after 60 s"
    assert isinstance(outcome["error"], PinError), outcome
    assert str(outcome["error"]) == f"tang {server.url}: timed out (no answer within 2 s)"
    took = outcome["took"]
    assert isinstance(took, float) and 1.9 <= took < 15, took


@pytest.mark.parametrize(("url", "reason"), [
    ("http://tang host", "holds a space, a control or a non-ASCII character"),
    ("http://tang\n.example", "holds a space, a control or a non-ASCII character"),
    ("http://127.0.0.1:99999", "the URL is malformed (its host or port)"),
    ("ftp://127.0.0.1/", "URL scheme 'ftp' is not http or https"),
    ("http://[::1", "the URL is malformed (its host or port)"),
    ("http://user:secret@127.0.0.1", "the URL holds credentials"),
    ("http:///tang", "the URL has no host"),
    ("http://127.0.0.1/?x=1", "the URL has a query or a fragment"),
    ("http://" + "a" * 300, "the URL's host name is not valid"),
])
def test_a_bad_url_is_refused_with_a_reason(url: str, reason: str) -> None:
    message = refusal(tang_jwe(url, b"x", KEY))
    assert message.startswith("tang ") and message.endswith(reason), message
    assert "secret" not in message


def test_a_host_that_does_not_resolve() -> None:
    message = refusal(tang_jwe("tanghost", b"x", KEY))
    assert message.startswith("tang tanghost: ") and len(message) > len("tang tanghost: ")


def test_file_urls_are_refused_without_a_look(tmp_path: Path) -> None:
    there = tmp_path / "there"
    there.mkdir()
    (there / "rec").mkdir()
    messages = []
    for path in (there, tmp_path / "absent"):
        message = refusal(tang_jwe(f"file://{path}", b"x", KEY))
        messages.append(message.replace(str(path), "PATH"))
    assert messages[0] == messages[1] == \
        "tang file://PATH: URL scheme 'file' is not http or https"


def test_a_url_without_a_scheme_is_http(tang: tuple[str, ec.EllipticCurvePrivateKey, type]
                                        ) -> None:
    url, key, handler = tang
    assert pins.decrypt(tang_jwe(url.removeprefix("http://"), b"the key", key), 10) \
        == b"the key"
    assert pins.decrypt(tang_jwe(url + "/", b"the key", key), 10) == b"the key"
    assert handler.requests == 2


def test_https_is_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with fake_tang(lambda s: context.wrap_socket(s, server_side=True)) as (server, handler):
        url = f"https://127.0.0.1:{server.server_address[1]}"
        jwe = tang_jwe(url, b"over TLS", handler.key)
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        assert refusal(jwe) == f"tang {url}: TLS: certificate verify failed: " \
            "self-signed certificate"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # (OpenSSL's default trust store)
        assert pins.decrypt(jwe, 10) == b"over TLS"


def test_compressed_content_is_inflated_or_refused(
        tang: tuple[str, ec.EllipticCurvePrivateKey, type]) -> None:
    url, key, _ = tang
    assert pins.decrypt(tang_jwe(url, b"", key, zip_data=deflate(b"zipped")), 10) == b"zipped"
    assert refusal(tang_jwe(url, b"", key, zip_data=b"\xff\xfe not deflate")) \
        == f"tang {url}: the JWE's compressed content is not valid DEFLATE"
    assert refusal(tang_jwe(url, b"", key, zip_data=deflate(b"cut")[:-1])) \
        == f"tang {url}: the JWE's compressed content is truncated or has data past its end"


def test_a_header_without_enc(tang: tuple[str, ec.EllipticCurvePrivateKey, type]) -> None:
    url, key, _ = tang
    assert refusal(tang_jwe(url, b"x", key, drop="enc")) \
        == f"tang {url}: JWE content encryption None is not supported"


BOMB = r"""
import json, os, resource, sys, time, zlib
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nbdluks.unlock.clevis.jose import JoseError, Jwe, b64e

mib = int(sys.argv[1])
co = zlib.compressobj(9, zlib.DEFLATED, -15)
block = co.compress(bytes(1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)  # 1 MiB of zeros
data = block * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
key, iv = os.urandom(32), os.urandom(12)
protected = b64e(b'{"alg":"dir","enc":"A256GCM","zip":"DEF"}')
sealed = AESGCM(key).encrypt(iv, data, protected.encode())
jwe = {"protected": protected, "iv": b64e(iv), "ciphertext": b64e(sealed[:-16]),
       "tag": b64e(sealed[-16:])}
del data, sealed
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
try:
    outcome = "decrypted %d bytes" % len(Jwe.parse(jwe).decrypt(key))
except JoseError as e:
    outcome = str(e)
took = time.monotonic() - started
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"outcome": outcome, "took": took, "grew_kib": grew, "size": len(block) * mib}))
"""


@pytest.mark.parametrize(("mib", "reason"), [
    (1024, "the JWE's compressed content is larger than 256 KiB"),
    (200, "the JWE's compressed content inflates to more than 64 KiB"),
])
def test_a_zip_bomb_is_refused_early(mib: int, reason: str) -> None:
    p = subprocess.run([sys.executable, "-c", BOMB, str(mib)], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).resolve().parents[3])
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["grew_kib"] < 64 * 1024, result
    assert result["took"] < 10, result
    assert result["outcome"] == reason, result


def test_sss_recovers_through_nested_pins(
        tang: tuple[str, ec.EllipticCurvePrivateKey, type]) -> None:
    url, key, _ = tang
    jwe = sss_jwe(2, [lambda pt: tang_jwe(url, pt, key)] * 2
                  + [lambda pt: tang_jwe("http://127.0.0.1:1", pt, key), lambda pt: NULL],
                  b"the passphrase")
    assert pins.decrypt(jwe, 10) == b"the passphrase"
    jwe = sss_jwe(3, [lambda pt: tang_jwe(url, pt, key)] * 2
                  + [lambda pt: tang_jwe("http://127.0.0.1:1", pt, key), lambda pt: NULL],
                  b"the passphrase")
    message = refusal(jwe)
    assert message.startswith("sss needs 3 of 4 pins, 2 answered: ")
    assert sorted(message.split(": ", 1)[1].split("; ")) == [
        "pin 'null' is not supported here (only tang and sss)",
        "tang http://127.0.0.1:1: Connection refused"]


def chain(levels: int, url: str, key: ec.EllipticCurvePrivateKey, plain: bytes) -> str:
    """`levels` sss pins, each within the last, around a tang pin."""
    if levels == 0:
        return tang_jwe(url, plain, key)
    return sss_jwe(1, [lambda pt: chain(levels - 1, url, key, pt)], plain)


def test_sss_nested_as_deep_as_allowed(tang: tuple[str, ec.EllipticCurvePrivateKey, type]
                                       ) -> None:
    url, key, _ = tang
    assert pins.decrypt(chain(pins.MAX_DEPTH, url, key, b"deep"), 10) == b"deep"
    assert refusal(chain(pins.MAX_DEPTH + 1, url, key, b"deeper")) \
        == "sss: pins nested more than 4 deep"


@pytest.mark.parametrize(("prime", "reason"), [
    (b"\x00", "sss: the prime p (1 bytes) is empty, too small or too large"),
    (b"", "sss: the prime p (0 bytes) is empty, too small or too large"),
    (bytes(65) + b"\x07", "sss: the prime p (66 bytes) is empty, too small or too large"),
], ids=["zero", "empty", "huge"])
def test_sss_with_a_bad_prime(tang: tuple[str, ec.EllipticCurvePrivateKey, type],
                              prime: bytes, reason: str) -> None:
    url, key, _ = tang
    share = (1).to_bytes(len(prime), "big") + bytes(len(prime)) if prime else b""
    jwe = sss_raw({"t": 1, "p": b64e(prime), "jwe": [tang_jwe(url, share, key)]},
                  os.urandom(32), b"x")
    assert refusal(jwe) == reason


def test_sss_modulus_that_is_not_prime(tang: tuple[str, ec.EllipticCurvePrivateKey, type]
                                       ) -> None:
    url, key, _ = tang
    shares = [bytes([3, 0]), bytes([8, 0])]  # mod 15, 8 - 3 has no inverse
    jwe = sss_raw({"t": 2, "p": b64e(b"\x0f"), "jwe": [tang_jwe(url, s, key) for s in shares]},
                  os.urandom(32), b"x")
    assert refusal(jwe) == "sss: the sss modulus p is not a prime"


P_TEXT = b64e(((1 << 255) - 19).to_bytes(32, "big"))
NULL = b64e(b'{"clevis":{"pin":"null"}}') + "...."


def clevis_threads(besides: frozenset[int] = frozenset()) -> int:
    return sum(t.name == "clevis-pin" and t.ident not in besides for t in threading.enumerate())


def test_sss_with_thousands_of_pins_is_refused_at_once() -> None:
    before = clevis_threads()
    jwe = sss_raw({"t": 1, "p": P_TEXT, "jwe": [NULL] * 2000}, os.urandom(32), b"x")
    assert refusal(jwe) == "sss: 2000 nested pins, more than the 16 allowed"
    assert clevis_threads() == before
    assert pins.describe(jwe) == {"pin": None,
                                  "error": "2000 nested pins, more than the 16 allowed"}


def test_sss_with_too_many_pins_in_all() -> None:
    inner = sss_raw({"t": 1, "p": P_TEXT, "jwe": [NULL] * 16}, os.urandom(32), b"")
    jwe = sss_raw({"t": 1, "p": P_TEXT, "jwe": [inner] * 5}, os.urandom(32), b"x")
    assert refusal(jwe) == "sss: more than 64 pins in all"


def test_sss_nested_too_deep() -> None:
    jwe = NULL
    for _ in range(25):  # (each level is the last one base64'd: 25 are some 200 KiB)
        jwe = sss_raw({"t": 1, "p": P_TEXT, "jwe": [jwe]}, os.urandom(32), b"")
    assert refusal(jwe) == "sss: pins nested more than 4 deep"
    tree = pins.describe(jwe)
    for _ in range(4):
        tree = tree["pins"][0]
    assert tree == {"pin": None, "error": "sss pins nested more than 4 deep"}


def test_sss_with_16_pins_one_of_them_usable(
        tang: tuple[str, ec.EllipticCurvePrivateKey, type]) -> None:
    url, key, _ = tang
    jwe = sss_jwe(1, [lambda pt: NULL] * 15 + [lambda pt: tang_jwe(url, pt, key)], b"ok")
    assert pins.decrypt(jwe, 10) == b"ok"


def test_the_threads_of_an_sss_pin_are_bounded(raw: Callable[[Answer], Raw]) -> None:
    """16 pins at a server that never answers: at most 8 exchanges at once."""
    seen: list[int] = []
    before = frozenset(t.ident for t in threading.enumerate() if t.ident is not None)

    def silent(sock: socket.socket, stop: threading.Event) -> None:
        read_request(sock)
        seen.append(clevis_threads(before))
        while sock.recv(4096):
            pass

    server = raw(silent)
    jwe = sss_jwe(16, [lambda pt: tang_jwe(server.url, pt, KEY)] * 16, b"x")
    started = time.monotonic()
    with pytest.raises(PinError) as e:
        pins.decrypt(jwe, 1)
    assert time.monotonic() - started < 30
    assert seen and max(seen) <= 8, seen  # (pins.THREADS)
    message = str(e.value)
    assert message.startswith("sss needs 16 of 16 pins, 0 answered: "
                              f"tang {server.url}: timed out (no answer within 1 s)")
    assert message.count("timed out") == 16 and "\n" not in message
