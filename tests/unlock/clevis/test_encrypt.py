"""Binding as `clevis encrypt` binds, judged by the real tools: tangd serves
the advertisements and answers the recoveries, `clevis decrypt` must print
the secret back (and nbdluks' own decrypt recover it); where clevis refuses
a configuration or an advertisement, so must nbdluks."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdluks.unlock.clevis import pins
from nbdluks.unlock.clevis.encrypt import EncryptError, UntrustedError, encrypt
from tests.conftest import free_port, need, run
from tests.unlock.test_tokens import TANGD, Tang

SECRET = os.urandom(48)  # any bytes, as a LUKS passphrase clevis generates or not


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("clevis", "jose", "socat", "curl", "openssl", TANGD)



def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def header(jwe: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(b64d(jwe.split(".")[0]))
    return out


def clevis_decrypt(jwe: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["clevis", "decrypt"], input=jwe.encode(), capture_output=True,
                          timeout=120)


def decrypts(jwe: str) -> bytes:
    p = clevis_decrypt(jwe)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def clevis_encrypt(pin: str, cfg: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[
        bytes]:
    return subprocess.run(["clevis", "encrypt", pin, json.dumps(cfg), *flags], input=SECRET,
                          capture_output=True, timeout=120)


def ours(pin: str, cfg: dict[str, Any] | str, *, trust: bool = False) -> str:
    return encrypt(pin, cfg, SECRET, timeout=20, trust=trust)


def refused(pin: str, cfg: dict[str, Any] | str, *, trust: bool = False) -> str:
    with pytest.raises(EncryptError) as e:
        ours(pin, cfg, trust=trust)
    msg = str(e.value)
    assert "\n" not in msg and SECRET.hex() not in msg
    return msg


def signing_key(t: Tang) -> Path:
    """The tang database's file of its signing key."""
    (path,) = [p for p in t.db.glob("*.jwk") if "sign" in json.loads(p.read_text())["key_ops"]]
    return path


def thp(path: Path, alg: str = "S256") -> str:
    return run(["jose", "jwk", "thp", "-a", alg, "-i", str(path)]).stdout.strip()


def advertisement(t: Tang) -> dict[str, Any]:
    """The server's advertisement, as `curl -f URL/adv > adv.jws` saves it."""
    out: dict[str, Any] = json.loads(run(["curl", "-sf", f"{t.url}/adv"]).stdout)
    return out


@pytest.mark.parametrize("scheme", ["http://", ""])
def test_tang_is_what_clevis_makes(tang, scheme: str) -> None:
    a = tang("a")
    cfg = {"url": scheme + a.url.removeprefix("http://")}
    jwe = ours("tang", cfg, trust=True)
    assert decrypts(jwe) == SECRET
    assert pins.decrypt(jwe, 20) == SECRET
    # the header has what clevis's has, written as jose writes it
    p = clevis_encrypt("tang", cfg, "-y")
    assert p.returncode == 0, p.stderr.decode()
    theirs = p.stdout.decode()
    mine, its = header(jwe), header(theirs)
    assert sorted(mine) == sorted(its) == ["alg", "clevis", "enc", "epk", "kid"]
    assert mine["clevis"] == its["clevis"]  # the pin, the URL as given, the adv's keys
    assert mine["clevis"]["tang"]["url"] == cfg["url"]
    assert (mine["alg"], mine["enc"], mine["kid"]) == (its["alg"], its["enc"], its["kid"])
    assert sorted(mine["epk"]) == sorted(its["epk"]) == ["crv", "kty", "x", "y"]
    assert mine["epk"]["crv"] == its["epk"]["crv"] and mine["epk"]["x"] != its["epk"]["x"]
    for jwe_ in (jwe, theirs):
        parts = jwe_.split(".")
        raw = b64d(parts[0])
        assert raw == json.dumps(json.loads(raw), separators=(",", ":"), sort_keys=True).encode()
        assert parts[1] == "" and len(b64d(parts[2])) == 12 and len(b64d(parts[4])) == 16
    assert len(b64d(jwe.split(".")[3])) == len(SECRET)


@pytest.mark.parametrize("alg", ["S256", "S1"])
def test_a_thp_trusts_the_advertisement(tang, alg: str) -> None:
    a = tang("a")
    cfg = {"url": a.url, "thp": thp(signing_key(a), alg)}
    jwe = ours("tang", cfg)  # not trusted blindly: the thumbprint is checked
    assert decrypts(jwe) == SECRET
    assert clevis_encrypt("tang", cfg).returncode == 0  # clevis too takes it, not asking


def test_a_wrong_thp_is_refused(tang) -> None:
    a = tang("a")
    (exchange,) = [p for p in a.db.glob("*.jwk") if p != signing_key(a)]
    wrong = thp(exchange)  # a key of the server, but not a signing one
    msg = refused("tang", {"url": a.url, "thp": wrong})  # Tang has no adv it signs: 404
    assert msg == f"tang {a.url}: advertisement: HTTP 404 Not Found (the server has no " \
                  f"signing key {wrong})"
    assert clevis_encrypt("tang", {"url": a.url, "thp": wrong}).returncode != 0
    # given the advertisement, the thumbprint is checked against its signing keys
    cfg = {"url": a.url, "thp": wrong, "adv": advertisement(a)}
    msg = refused("tang", cfg, trust=True)
    assert msg == f'tang {a.url}: no signing key of the advertisement has the thumbprint ' \
                  f'{wrong} given as "thp" (its signing keys: {thp(signing_key(a))})'
    p = clevis_encrypt("tang", cfg)
    assert p.returncode != 0 and b"did not sign the advertisement" in p.stderr


def test_an_untrusted_advertisement_is_refused(tang) -> None:
    a = tang("a")
    with pytest.raises(UntrustedError) as e:
        ours("tang", {"url": a.url})
    assert e.value.thumbprints == [thp(signing_key(a))]
    assert str(e.value) == (
        f"tang {a.url}: the advertisement is not trusted: check that one of its signing "
        f"keys' thumbprints ({thp(signing_key(a))}) is the server's, and give it as "
        '"thp", or trust the advertisement')
    # in an sss pin too, before anything is encrypted
    b = tang("b")
    with pytest.raises(UntrustedError) as e:
        ours("sss", {"t": 1, "pins": {"tang": [{"url": a.url, "thp": thp(signing_key(a))},
                                               {"url": b.url}]}})
    assert e.value.url == b.url


@pytest.mark.parametrize("form", ["inline", "file"])
def test_a_given_advertisement_needs_no_network(tang, tmp_path: Path, form: str) -> None:
    a = tang("a")
    adv = advertisement(a)
    path = tmp_path / "adv.jws"
    path.write_text(json.dumps(adv))
    cfg = {"url": a.url, "adv": adv if form == "inline" else str(path)}
    a.stop()  # nothing listens: any request would fail
    jwe = ours("tang", cfg)  # trusted as given, as clevis does
    assert header(jwe)["clevis"]["tang"]["adv"] == json.loads(b64d(adv["payload"]))
    p = clevis_encrypt("tang", cfg)
    assert p.returncode == 0, p.stderr.decode()
    a.start()
    assert decrypts(jwe) == SECRET
    assert pins.decrypt(jwe, 20) == SECRET


def _tamper_signature(adv: dict[str, Any]) -> None:
    sig = bytearray(b64d(adv["signature"]))
    sig[len(sig) // 2] ^= 1
    adv["signature"] = base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def _tamper_payload(adv: dict[str, Any]) -> None:
    """Another exchange key in the payload (someone else's), the signature kept."""
    keys = json.loads(b64d(adv["payload"]))
    other = json.loads(run(["jose", "jwk", "gen", "-i", '{"alg":"ECMR"}']).stdout)
    other = {k: v for k, v in other.items() if k != "d"}
    keys["keys"] = [k for k in keys["keys"] if "deriveKey" not in k["key_ops"]] + [other]
    adv["payload"] = base64.urlsafe_b64encode(json.dumps(keys).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("tamper", [_tamper_signature, _tamper_payload],
                         ids=["signature", "payload"])
def test_a_wrong_signature_is_refused(tang, tamper: Callable[[dict[str, Any]], None]) -> None:
    a = tang("a")
    adv = advertisement(a)
    assert "signature" in adv  # (one signing key: the flattened form)
    tamper(adv)
    cfg = {"url": a.url, "adv": adv}
    msg = refused("tang", cfg, trust=True)
    assert msg == f"tang {a.url}: the advertisement's signature by its signing key " \
                  f"{thp(signing_key(a))} is missing or wrong"
    p = clevis_encrypt("tang", cfg, "-y")
    assert p.returncode != 0 and b"Advertisement is missing signatures!" in p.stderr


def test_other_algorithms_and_signatures(tang) -> None:
    """A server signing with ES256 and PS256 (the JWS's general form), its
    exchange key on P-256; trusted by the SHA-1 thumbprint of the RSA key."""
    a = tang("a")
    for path in a.db.glob("*.jwk"):
        path.unlink()
    for name, tmpl in [("es", '{"alg":"ES256"}'), ("ps", '{"alg":"PS256"}'),
                       ("ecmr", '{"alg":"ECMR","crv":"P-256"}')]:
        run(["jose", "jwk", "gen", "-i", tmpl, "-o", str(a.db / f"{name}.jwk")])
    assert len(advertisement(a)["signatures"]) == 2
    cfg = {"url": a.url, "thp": thp(a.db / "ps.jwk", "S1")}
    jwe = ours("tang", cfg)
    assert header(jwe)["epk"]["crv"] == "P-256"
    assert decrypts(jwe) == SECRET
    assert pins.decrypt(jwe, 20) == SECRET
    with pytest.raises(UntrustedError) as e:
        ours("tang", {"url": a.url})
    assert sorted(e.value.thumbprints) == sorted(thp(a.db / f"{n}.jwk") for n in ("es", "ps"))


def _is_prime(n: int) -> bool:
    return run(["openssl", "prime", str(n)]).stdout.strip().endswith("is prime")


@pytest.mark.parametrize("t", [1, 2])
def test_sss_of_two_tangs(tang, t: int) -> None:
    a, b = tang("a"), tang("b")
    jwe = ours("sss", {"t": t, "pins": {"tang": [{"url": a.url}, {"url": b.url}]}}, trust=True)
    hdr = header(jwe)
    assert sorted(hdr) == ["alg", "clevis", "enc"] and (hdr["alg"], hdr["enc"]) == \
        ("dir", "A256GCM")
    cfg = hdr["clevis"]["sss"]
    assert hdr["clevis"]["pin"] == "sss" and sorted(cfg) == ["jwe", "p", "t"] and cfg["t"] == t
    assert [header(j)["clevis"]["tang"]["url"] for j in cfg["jwe"]] == [a.url, b.url]
    p = int.from_bytes(b64d(cfg["p"]), "big")  # as clevis's: a 256-bit safe prime
    assert len(b64d(cfg["p"])) == 32 and p.bit_length() == 256
    assert _is_prime(p) and _is_prime((p - 1) // 2)
    assert decrypts(jwe) == SECRET
    assert pins.decrypt(jwe, 20) == SECRET
    b.stop()
    if t == 1:
        assert decrypts(jwe) == SECRET  # one server is enough
        assert pins.decrypt(jwe, 20) == SECRET
    else:
        assert clevis_decrypt(jwe).returncode != 0
        with pytest.raises(pins.PinError):
            pins.decrypt(jwe, 20)


def test_nested_sss(tang) -> None:
    a, b, c = tang("a"), tang("b"), tang("c")
    cfg = {"t": 2, "pins": {"tang": [{"url": a.url, "thp": thp(signing_key(a))}],
                            "sss": {"t": 1, "pins": {"tang": [{"url": b.url},
                                                              {"url": c.url}]}}}}
    jwe = ours("sss", cfg, trust=True)
    nested = header(jwe)["clevis"]["sss"]["jwe"]
    assert [header(j)["clevis"]["pin"] for j in nested] == ["tang", "sss"]
    assert decrypts(jwe) == SECRET
    b.stop()  # the nested sss needs one of b and c
    assert decrypts(jwe) == SECRET
    assert pins.decrypt(jwe, 20) == SECRET
    a.stop()  # the outer one needs both a and the nested sss
    assert clevis_decrypt(jwe).returncode != 0


def _deep(n: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {"pins": {"tang": {"url": "127.0.0.1:9"}}}
    for _ in range(n):
        cfg = {"pins": {"sss": cfg}}
    return cfg


@pytest.mark.parametrize(("pin", "cfg", "expected"), [
    ("tang", {}, 'tang: the configuration has no "url" string'),
    ("tang", "{", "clevis encrypt: the configuration is not JSON"),
    ("tang", [], "tang: the configuration is not a JSON object"),
    ("tang", {"url": "ftp://h/"}, "tang ftp://h/: URL scheme 'ftp' is not http or https"),
    ("tang", {"url": "h", "thp": 1}, 'tang h: "thp" is not a string'),
    ("tang", {"url": "h", "thp": "a/b"}, "tang h: \"thp\" 'a/b' is not a key thumbprint "
                                         "(base64url)"),
    ("tang", {"url": "h", "adv": 5}, 'tang h: "adv" is neither an advertisement (a JSON '
                                     'object) nor a file name'),
    ("tang", {"url": "h", "adv": "/nonexistent/adv.jws"},
     "tang h: advertisement file '/nonexistent/adv.jws': No such file or directory"),
    ("sss", {"t": 1}, 'sss: the configuration has no "pins" object'),
    ("sss", {"t": "1", "pins": {}}, "sss: the threshold \"t\" is not an integer: '1'"),
    ("sss", {"t": 3, "pins": {"tang": [{"url": "h"}, {"url": "h"}]}},
     "sss: the threshold t=3 is not from 1 to 2, the number of pins"),
    ("sss", {"pins": {"tang": [{"url": "h"}], "tpm2": {}}},
     "pin tpm2 is not supported here (only tang and sss)"),
    ("sss", {"pins": {"tang": "h"}}, "sss: the configuration of pin tang is neither an "
                                     "object nor a list"),
    ("sss", _deep(4), "sss: pins nested more than 4 deep"),
    ("null", {}, "pin null is not supported here (only tang and sss)"),
])
def test_configurations_refused_before_any_request(pin: str, cfg: Any, expected: str) -> None:
    assert refused(pin, cfg) == expected  # (no server: "h" is never looked up)


def test_an_unreachable_server_is_named(tang) -> None:
    a = tang("a")
    port = free_port()  # nothing listens there
    msg = refused("sss", {"t": 1, "pins": {"tang": [{"url": a.url},
                                                    {"url": f"127.0.0.1:{port}"}]}}, trust=True)
    assert msg == f"tang 127.0.0.1:{port}: advertisement: Connection refused"
