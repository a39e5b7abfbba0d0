"""Encrypting with clevis pins: the compact JWE `clevis encrypt PIN CONFIG
[-y]` writes, for the pins "tang" and "sss" (sss nesting tang and sss), so
that a volume can be bound as `clevis luks bind` binds it.

    encrypt(pin, config, secret, *, timeout=10.0, trust=False) -> str

`config` is clevis's: for tang {"url", "thp"?, "adv"?}, for sss
{"t"?, "pins": {"tang": [{...}, ...], "sss": {...}}}. It is done in three
steps, so that nothing secret is handled before every part is known good:

1. the pin tree is read whole and checked (the bounds of pins.py: what is
   bound here can be unlocked by nbdluks), advertisement files read;
2. each Tang server's advertisement is had (given inline or as a file, or
   fetched from URL/adv/THP within `timeout` seconds, one server after the
   other), verified and trusted: when "thp" is the thumbprint of one of its
   signing keys (SHA-256 or SHA-1), when it was given in the configuration
   and no "thp" was, or when `trust` (clevis's -y); otherwise an
   UntrustedError names the signing keys' thumbprints (nothing prompts);
3. the secret is encrypted: tang with ECDH-ES against the server's exchange
   key, sss with a fresh polynomial over a 256-bit safe prime whose value
   at 0 is the A256GCM key and whose points each nested pin encrypts.

Every failure is an EncryptError naming the pin (and its URL); no secret,
share or key is ever in one. Key material held in bytearrays is wiped.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import NbdluksError
from . import sss
from .http import Endpoint, HttpStatusError, fetch
from .jose import JoseError, b64e, clip, label, loads, seal
from .pins import MAX_DEPTH, MAX_TREE, reason, shown
from .tang import Advertisement, binding

MAX_ADV_FILE = 1024 * 1024  # an advertisement is a few KiB
_THP = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a thumbprint: base64url
KEY_BYTES = 32  # A256GCM, as clevis's sss_generate(32, t)
# Sieving candidates for safe primes: the odd primes below 2000, multiplied.
_PRIMORIAL = math.prod(n for n in range(3, 2000, 2)
                       if all(n % d for d in range(3, math.isqrt(n) + 1, 2)))


class EncryptError(NbdluksError):
    """A pin that could not encrypt: names the pin and why."""


class UntrustedError(EncryptError):
    """A Tang advertisement neither trusted by a "thp" nor by `trust`: the
    thumbprints (SHA-256) of its signing keys are what to check."""

    def __init__(self, url: str, thumbprints: list[str]) -> None:
        super().__init__(
            f"tang {shown(url)}: the advertisement is not trusted: check that one of its "
            f"signing keys' thumbprints ({', '.join(thumbprints)}) is the server's, and give "
            f'it as "thp", or trust the advertisement')
        self.url = url
        self.thumbprints = thumbprints


@dataclass
class _Tang:
    url: str
    thp: str | None
    given: Any  # an advertisement from the configuration, or None: fetch it
    adv: Advertisement | None = field(default=None)  # once had and trusted

    @property
    def where(self) -> str:
        return f"tang {shown(self.url)}"


@dataclass(frozen=True)
class _Sss:
    t: int
    pins: list[_Tang | _Sss]


def encrypt(pin: str, config: str | Mapping[str, Any], secret: bytes | bytearray, *,
            timeout: float = 10.0, trust: bool = False) -> str:
    """The compact JWE of `secret` that `clevis encrypt PIN CONFIG` (with -y
    when `trust`) writes; `config` is its JSON text or the parsed object.
    Each advertisement fetched has `timeout` seconds in all."""
    try:
        cfg = loads(config, "the configuration") if isinstance(config, str) else config
        root = _plan(pin, cfg, 0, [MAX_TREE])
        for node in _tangs(root):
            node.adv = _advertisement(node, timeout, trust)
        return _seal(root, secret)
    except EncryptError:
        raise
    except JoseError as e:
        raise EncryptError(f"clevis encrypt: {e}") from None
    except Exception as e:  # a bug must still say nothing of the secret
        raise EncryptError(f"clevis encrypt: unexpected {type(e).__name__}") from None


def _plan(pin: Any, cfg: Any, depth: int, budget: list[int]) -> _Tang | _Sss:
    """The pin tree of a configuration, checked and bounded; nothing fetched."""
    budget[0] -= 1
    if budget[0] < 0:
        raise EncryptError(f"sss: more than {MAX_TREE} pins in all")
    if pin not in ("tang", "sss"):
        raise EncryptError(f"pin {label(pin)} is not supported here (only tang and sss)")
    if not isinstance(cfg, Mapping):
        raise EncryptError(f"{pin}: the configuration is not a JSON object")
    if pin == "tang":
        return _plan_tang(cfg)
    return _plan_sss(cfg, depth, budget)


def _plan_sss(cfg: Mapping[str, Any], depth: int, budget: list[int]) -> _Sss:
    if depth >= MAX_DEPTH:
        raise EncryptError(f"sss: pins nested more than {MAX_DEPTH} deep")
    t, pins = cfg.get("t", 1), cfg.get("pins")
    if not isinstance(pins, Mapping):
        raise EncryptError('sss: the configuration has no "pins" object')
    if not isinstance(t, int) or isinstance(t, bool):
        raise EncryptError(f'sss: the threshold "t" is not an integer: {clip(t)}')
    children: list[_Tang | _Sss] = []
    for name, cfgs in pins.items():
        if not isinstance(cfgs, list | Mapping):
            raise EncryptError(f"sss: the configuration of pin {label(name)} is neither an "
                               "object nor a list")
        for child in cfgs if isinstance(cfgs, list) else [cfgs]:
            children.append(_plan(name, child, depth + 1, budget))
    if len(children) > sss.MAX_PINS:
        raise EncryptError(f"sss: {len(children)} pins, more than the {sss.MAX_PINS} allowed")
    if not 1 <= t <= len(children):
        raise EncryptError(f"sss: the threshold t={clip(t)} is not from 1 to {len(children)}, "
                           "the number of pins")
    return _Sss(t, children)


def _plan_tang(cfg: Mapping[str, Any]) -> _Tang:
    url, thp, adv = cfg.get("url"), cfg.get("thp"), cfg.get("adv")
    if not isinstance(url, str):
        raise EncryptError('tang: the configuration has no "url" string')
    where = f"tang {shown(url)}"
    try:
        Endpoint.at(url, "/adv/")
    except JoseError as e:
        raise EncryptError(f"{where}: {e}") from None
    if thp is not None and not isinstance(thp, str):
        raise EncryptError(f'{where}: "thp" is not a string')
    if thp and not _THP.fullmatch(thp):
        raise EncryptError(f'{where}: "thp" {clip(thp)} is not a key thumbprint (base64url)')
    if isinstance(adv, str):
        adv = _adv_file(where, adv)
    elif adv is not None and not isinstance(adv, Mapping):
        raise EncryptError(f'{where}: "adv" is neither an advertisement (a JSON object) '
                           "nor a file name")
    return _Tang(url, thp or None, adv)


def _adv_file(where: str, name: str) -> Any:
    """An advertisement in a file (as `curl URL/adv > FILE` saves it)."""
    try:
        with open(name, "rb") as f:
            data = f.read(MAX_ADV_FILE + 1)
    except OSError as e:
        raise EncryptError(f"{where}: advertisement file {clip(name, 200)}: "
                           f"{e.strerror or type(e).__name__}") from None
    if len(data) > MAX_ADV_FILE:
        raise EncryptError(f"{where}: advertisement file {clip(name, 200)} is larger than "
                           f"{MAX_ADV_FILE // 1024} KiB")
    try:
        adv = json.loads(data)
    except (ValueError, RecursionError):
        adv = None
    if not isinstance(adv, dict):
        raise EncryptError(f"{where}: advertisement file {clip(name, 200)} is not a JSON "
                           "object")
    return adv


def _tangs(node: _Tang | _Sss) -> list[_Tang]:
    if isinstance(node, _Tang):
        return [node]
    return [t for n in node.pins for t in _tangs(n)]


def _advertisement(node: _Tang, timeout: float, trust: bool) -> Advertisement:
    """The server's advertisement, verified and trusted (or an EncryptError)."""
    jws = node.given if node.given is not None else _fetch(node, timeout)
    try:
        adv = Advertisement.verified(jws)
        known = adv.thumbprints()
    except JoseError as e:
        raise EncryptError(f"{node.where}: {e}") from None
    if node.thp is not None:  # (checked with trust too: it was asked for)
        if not adv.signed_by(node.thp):
            raise EncryptError(f"{node.where}: no signing key of the advertisement has the "
                               f"thumbprint {node.thp} given as \"thp\" (its signing keys: "
                               f"{', '.join(known)})")
    elif node.given is None and not trust:
        raise UntrustedError(node.url, known)
    return adv


def _fetch(node: _Tang, timeout: float) -> Any:
    """GET URL/adv/THP, as clevis's curl does (a named thp asks Tang for an
    advertisement that key signs too)."""
    try:
        answer = fetch(Endpoint.at(node.url, f"/adv/{node.thp or ''}"), timeout)
        return loads(answer, "the advertisement")
    except HttpStatusError as e:
        hint = f" (the server has no signing key {node.thp})" \
            if e.status == 404 and node.thp else ""
        raise EncryptError(f"{node.where}: advertisement: {e}{hint}") from None
    except (JoseError, OSError, UnicodeError) as e:
        raise EncryptError(f"{node.where}: advertisement: {reason(e, timeout)}") from None


def _seal(node: _Tang | _Sss, plain: bytes | bytearray) -> str:
    if isinstance(node, _Sss):
        return _seal_sss(node, plain)
    assert node.adv is not None
    try:
        header, cek = binding(node.url, node.adv)
        try:
            return seal(header, cek, plain)
        finally:
            _wipe(cek)
    except JoseError as e:
        raise EncryptError(f"{node.where}: {e}") from None


def _seal_sss(node: _Sss, plain: bytes | bytearray) -> str:
    """clevis-encrypt-sss: a polynomial of degree t-1 over GF(p), p a
    256-bit safe prime; its value at 0, padded to 32 bytes, is the A256GCM
    key; each nested pin encrypts one point x || y (32 bytes each)."""
    p = safe_prime(KEY_BYTES * 8)
    coefficients = [secrets.randbelow(p) for _ in range(node.t)]
    key = bytearray(coefficients[0].to_bytes(KEY_BYTES, "big"))
    xs: set[int] = set()
    while len(xs) < len(node.pins):
        xs.add(secrets.randbelow(p - 1) + 1)
    try:
        jwes = []
        for child, x in zip(node.pins, xs, strict=True):
            y = 0
            for e in reversed(coefficients):  # Horner: sum of e[i] * x^i
                y = (y * x + e) % p
            point = bytearray(x.to_bytes(KEY_BYTES, "big") + y.to_bytes(KEY_BYTES, "big"))
            try:
                jwes.append(_seal(child, point))
            finally:
                _wipe(point)
        header = {"alg": "dir", "enc": "A256GCM", "clevis": {
            "pin": "sss", "sss": {"jwe": jwes, "p": b64e(p.to_bytes(KEY_BYTES, "big")),
                                  "t": node.t}}}
        try:
            return seal(header, key, plain)
        except JoseError as e:
            raise EncryptError(f"sss: {e}") from None
    finally:
        _wipe(key)
        coefficients.clear()


def safe_prime(bits: int) -> int:
    """A random safe prime p = 2q + 1 of exactly `bits` bits, its two top
    bits set (q prime too), as OpenSSL's BN_generate_prime_ex(safe=1)."""
    while True:
        q = secrets.randbits(bits - 1) | (3 << (bits - 3)) | 1
        p = 2 * q + 1
        if math.gcd(p * q, _PRIMORIAL) != 1 or pow(2, p - 1, p) != 1:
            continue
        if probably_prime(q) and probably_prime(p):
            return p


def probably_prime(n: int, rounds: int = 64) -> bool:
    """Miller-Rabin with random bases (a composite passes with odds below 4^-rounds)."""
    if n < 5 or n % 2 == 0:
        return n in (2, 3)
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))

