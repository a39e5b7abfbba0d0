"""Network-bound unlock against real parts: Tang servers (tangd behind
socat, as Debian runs it), volumes bound with `clevis luks bind`, nbdluks
serving them with no secret given."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdluks.unlock.clevis import pins
from tests.conftest import free_port, log_events, need, pattern, run, wait_listening
from tests.luks.reference import Made, fill, luks_format
from tests.unlock.clevis.hostile import Raw, b64d, b64e, read_request

MiB = 1 << 20
TANGD = "/usr/libexec/tangd"


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("cryptsetup", "clevis", "socat", "nbdcopy", TANGD)


class Tang:
    """tangd on a loopback port, one process per connection (socat fork)."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.db = tmp / f"tang-{name}"
        self.db.mkdir()
        run(["/usr/libexec/tangd-keygen", str(self.db)])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"tang-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork",
                 f"EXEC:{TANGD} {self.db}"], stdout=log, stderr=subprocess.STDOUT)
        wait_listening(self.proc, None, self.port, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def tangs(tmp_path: Path) -> Iterator[list[Tang]]:
    started: list[Tang] = []
    yield started
    for t in started:
        if t.proc is not None and t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def bind(target: Path, keyfile: Path, pin: str, cfg: dict[str, object]) -> None:
    run(["clevis", "luks", "bind", "-y", "-d", str(target), "-k", str(keyfile), pin,
         json.dumps(cfg)], timeout=120)


def bound_passphrase(target: Path, slot: int = 1) -> str:
    return run(["clevis", "luks", "pass", "-d", str(target), "-s", str(slot)]).stdout


def volume(tmp: Path, detached: bool) -> tuple[Made, bytes, Path]:
    made = luks_format(tmp, detached=detached, size=(2 if detached else 20) * MiB)
    size = (made.payload.stat().st_size - (0 if detached else made.offset))
    data = pattern(size, seed=11)
    fill(made, data)
    return made, data, made.header or made.payload


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`nbdluks serve` expected to fail before listening."""
    return subprocess.run([sys.executable, "-m", "nbdluks", "serve", *args],
                          capture_output=True, text=True, timeout=120)


def served(uri: str, tmp: Path) -> bytes:
    out = tmp / "out.img"
    out.unlink(missing_ok=True)
    run(["nbdcopy", uri, str(out)])
    return out.read_bytes()


@pytest.mark.parametrize("detached", [False, True], ids=["attached", "detached"])
def test_tang_bound_volume_serves_with_no_secret(nbdluks, tangs, tmp_path: Path,
                                                 detached: bool) -> None:
    tangs.append(Tang(tmp_path, "a"))
    made, data, target = volume(tmp_path, detached)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    args = ["--payload", str(made.payload)] + (["--header", str(target)] if detached else [])
    srv = nbdluks(*args)  # no key option at all
    assert served(srv.uri, tmp_path) == data
    assert srv.stop() == 0
    log = srv.log_text()
    assert '"unlocked through a token"' in log and '"keyslot": 1' in log
    # what the pin recovered is what clevis itself recovers
    token = json.loads(run(["cryptsetup", "token", "export", "--token-id", "0",
                            str(target)]).stdout)
    assert pins.decrypt(token["jwe"], 10).decode() == bound_passphrase(target)


def test_header_from_an_nbd_source(nbdluks, tangs, upstreams, tmp_path: Path) -> None:
    from tests.conftest import Upstream

    need("nbdkit")
    tangs.append(Tang(tmp_path, "a"))
    made, data, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    upstreams.append(Upstream("nbdkit", target, tmp_path, tcp=False, read_only=True))
    srv = nbdluks("--payload", str(made.payload), "--header", upstreams[0].uri, "--token-only")
    assert served(srv.uri, tmp_path) == data
    assert srv.stop() == 0


def sss_cfg(t: int, urls: list[str]) -> dict[str, object]:
    return {"t": t, "pins": {"tang": [{"url": u} for u in urls]}}


def test_sss_one_of_two_survives_a_dead_server(nbdluks, tangs, tmp_path: Path) -> None:
    tangs += [Tang(tmp_path, "a"), Tang(tmp_path, "b")]
    made, data, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "sss", sss_cfg(1, [t.url for t in tangs]))
    out = run([sys.executable, "-m", "nbdluks", "inspect", str(target)]).stdout
    assert f"0: clevis, key slots 1, sss 1 of 2 [tang {tangs[0].url} (key " in out
    tangs[0].stop()
    srv = nbdluks("--payload", str(made.payload), "--header", str(target))
    assert served(srv.uri, tmp_path) == data
    assert srv.stop() == 0


def test_sss_two_of_two(nbdluks, tangs, tmp_path: Path) -> None:
    tangs += [Tang(tmp_path, "a"), Tang(tmp_path, "b")]
    made, data, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "sss", sss_cfg(2, [t.url for t in tangs]))
    srv = nbdluks("--payload", str(made.payload), "--header", str(target))
    assert served(srv.uri, tmp_path) == data
    assert srv.stop() == 0
    tangs[1].stop()  # one of the two needed is gone: refused, naming it
    p = serve("--payload", str(made.payload), "--header", str(target), "-k",
              str(tmp_path / "x.sock"))
    assert p.returncode == 1 and not (tmp_path / "x.sock").exists()
    assert "sss needs 2 of 2 pins, 1 answered" in p.stderr
    assert f"tang {tangs[1].url}: " in p.stderr and "Connection refused" in p.stderr


def test_every_server_down_fails_before_listening(tangs, tmp_path: Path) -> None:
    tangs += [Tang(tmp_path, "a"), Tang(tmp_path, "b")]
    made, _, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "sss", sss_cfg(1, [t.url for t in tangs]))
    for t in tangs:
        t.stop()
    p = serve("--payload", str(made.payload), "--header", str(target), "-k",
              str(tmp_path / "x.sock"))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "no token unlocked the volume: token 0 (clevis): sss needs 1 of 2 pins, " \
           "0 answered" in p.stderr
    for t in tangs:
        assert f"tang {t.url}: Connection refused" in p.stderr
    assert not (tmp_path / "x.sock").exists()


def test_silent_server_is_bounded_by_the_timeout(tangs, tmp_path: Path) -> None:
    tangs.append(Tang(tmp_path, "a"))
    made, _, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    tangs[0].stop()
    import socket

    with socket.socket() as silent:  # takes the port over, accepts, never answers
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", tangs[0].port))
        silent.listen()
        started = time.monotonic()
        p = serve("--payload", str(made.payload), "--header", str(target), "--tang-timeout",
                  "1", "-k", str(tmp_path / "x.sock"))
        took = time.monotonic() - started
    assert p.returncode == 1 and "timed out" in p.stderr, p.stderr
    assert took < 20


def test_rotated_keys_still_unlock(nbdluks, tangs, tmp_path: Path) -> None:
    tangs.append(Tang(tmp_path, "a"))
    made, data, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    run(["/usr/libexec/tangd-rotate-keys", "-d", str(tangs[0].db)])
    assert any(f.name.startswith(".") for f in tangs[0].db.iterdir())  # old keys hidden
    srv = nbdluks("--payload", str(made.payload), "--header", str(target))
    assert served(srv.uri, tmp_path) == data
    assert srv.stop() == 0


class _Liar(http.server.BaseHTTPRequestHandler):
    """A Tang server that answers recovery requests with `body`."""

    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/jwk+json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def _wrong_point() -> bytes:
    """A valid point of P-521 that is not the answer (another key's)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from nbdluks.unlock.clevis.jose import b64e

    pub = ec.generate_private_key(ec.SECP521R1()).public_key().public_numbers()
    return json.dumps({"kty": "EC", "crv": "P-521", "x": b64e(pub.x.to_bytes(66, "big")),
                       "y": b64e(pub.y.to_bytes(66, "big"))}).encode()


@pytest.mark.parametrize(("body", "message"), [
    (b"<html>nope</html>", "the Tang server's answer is not JSON"),
    (b'{"kty": "EC", "crv": "P-521", "x": "AAAA", "y": "AAAA"}', "is not a point of P-521"),
    (None, "does not decrypt with the recovered key"),
])
def test_a_lying_server_fails_cleanly(tangs, tmp_path: Path, body: bytes | None,
                                      message: str) -> None:
    tangs.append(Tang(tmp_path, "a"))
    made, _, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    tangs[0].stop()
    _Liar.body = body if body is not None else _wrong_point()
    liar = http.server.HTTPServer(("127.0.0.1", tangs[0].port), _Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    try:
        p = serve("--payload", str(made.payload), "--header", str(target), "-k",
                  str(tmp_path / "x.sock"))
    finally:
        liar.shutdown()
        liar.server_close()
    assert p.returncode == 1 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "x.sock").exists()


def test_a_corrupt_token_fails_cleanly_and_a_passphrase_still_works(
        nbdluks, tangs, tmp_path: Path) -> None:
    tangs.append(Tang(tmp_path, "a"))
    made, data, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    token = json.loads(run(["cryptsetup", "token", "export", "--token-id", "0",
                            str(target)]).stdout)
    ct = token["jwe"]["ciphertext"]
    token["jwe"]["ciphertext"] = ("B" if ct[0] != "B" else "C") + ct[1:]
    (tmp_path / "t.json").write_text(json.dumps(token))
    run(["cryptsetup", "token", "remove", "--token-id", "0", str(target)])
    run(["cryptsetup", "token", "import", "--token-id", "0", "--json-file",
         str(tmp_path / "t.json"), str(target)])
    p = serve("--payload", str(made.payload), "--header", str(target), "-k",
              str(tmp_path / "x.sock"))
    assert p.returncode == 1, p.stderr
    assert f"token 0 (clevis): tang {tangs[0].url}: the JWE does not decrypt" in p.stderr
    # a key option bypasses the tokens
    srv = nbdluks("--payload", str(made.payload), "--header", str(target),
                  "--passphrase-file", str(tmp_path / "vol.pass"))
    assert served(srv.uri, tmp_path) == data
    assert srv.stop() == 0


def retarget(token: dict[str, Any], url: str) -> dict[str, Any]:
    """The token with its tang pin's URL changed (its JWE then no longer
    decrypts, but the server is asked first)."""
    hdr = json.loads(b64d(token["jwe"]["protected"]))
    hdr["clevis"]["tang"]["url"] = url
    return {**token, "jwe": {**token["jwe"], "protected": b64e(json.dumps(hdr).encode())}}


def garbage(sock: socket.socket, stop: threading.Event) -> None:
    read_request(sock)
    sock.sendall(b"GARBAGE\r\n")


@pytest.mark.parametrize("first", ["garbage server", "space in the url"])
def test_a_broken_token_before_a_working_one(nbdluks, tangs, tmp_path: Path,
                                             first: str) -> None:
    """Token 0 fails (a server that answers garbage, a URL that cannot be):
    token 1, the same binding intact, still opens the volume."""
    tangs.append(Tang(tmp_path, "a"))
    made, data, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    good = json.loads(run(["cryptsetup", "token", "export", "--token-id", "0",
                           str(target)]).stdout)
    hostile = Raw(garbage)
    try:
        url = hostile.url if first == "garbage server" else "http://tang host"
        (tmp_path / "bad.json").write_text(json.dumps(retarget(good, url)))
        (tmp_path / "good.json").write_text(json.dumps(good))
        run(["cryptsetup", "token", "remove", "--token-id", "0", str(target)])
        for n, name in enumerate(("bad.json", "good.json")):
            run(["cryptsetup", "token", "import", "--token-id", str(n), "--json-file",
                 str(tmp_path / name), str(target)])
        out = run([sys.executable, "-m", "nbdluks", "inspect", str(target)]).stdout
        assert f"0: clevis, key slots 1, tang {url} (key " in out, out
        assert f"1: clevis, key slots 1, tang {tangs[0].url} (key " in out, out
        srv = nbdluks("--payload", str(made.payload), "--header", str(target))
        assert served(srv.uri, tmp_path) == data
        assert srv.stop() == 0
    finally:
        hostile.close()
    reason = ("the answer is not HTTP" if first == "garbage server" else
              "the URL is empty or holds a space, a control or a non-ASCII character")
    [warning] = log_events(srv.log_text(), "tokens did not unlock before this one")
    assert warning["failures"] == [f"token 0 (clevis): tang {url}: {reason}"]
    [unlocked] = log_events(srv.log_text(), "unlocked through a token")
    assert unlocked["token"] == 1


@pytest.mark.parametrize(("flags", "code", "message"), [
    (("--token-only", "--passphrase-file", "P"), 2, "exclude --passphrase-file"),
    (("--token-type", "luks2-keyring"), 2, "only clevis tokens can unlock here"),
    (("--tang-timeout", "0"), 2, "--tang-timeout must be more than 0"),
    (("--token-id", "7"), 1, "token 7 does not exist"),
])
def test_token_flags(tangs, tmp_path: Path, flags: tuple[str, ...], code: int,
                     message: str) -> None:
    tangs.append(Tang(tmp_path, "a"))
    made, _, target = volume(tmp_path, detached=True)
    bind(target, tmp_path / "vol.pass", "tang", {"url": tangs[0].url})
    args = [f.replace("P", str(tmp_path / "vol.pass")) if f == "P" else f for f in flags]
    p = serve("--payload", str(made.payload), "--header", str(target), *args, "-k",
              str(tmp_path / "x.sock"))
    assert p.returncode == code and message in p.stderr, p.stderr


def test_no_key_and_no_token(tmp_path: Path) -> None:
    made, _, target = volume(tmp_path, detached=True)
    p = serve("--payload", str(made.payload), "--header", str(target), "-k",
              str(tmp_path / "x.sock"))
    assert p.returncode == 1
    assert "no key was given and the volume has no token to unlock with (give " \
           "--passphrase-file" in p.stderr
    assert shutil.which("clevis")
