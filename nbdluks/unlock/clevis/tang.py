"""The McCallum-Relyea exchange of a Tang pin, sans I/O; and its binding.

At binding, clevis made an ephemeral key c, put C = cG in the JWE as `epk`
and encrypted with the ECDH-ES secret of c and the server's key S = sG.
To recover it we blind C with a fresh E = eG: the server sees only C + E,
answers s(C + E), and s(C + E) - eS = sC = cS is the shared point; the
server never learns it. The point arithmetic, which `cryptography` does not
expose, comes from the `ecdsa` package.

The request and its answer travel over HTTP (http.py).

Binding is what clevis-encrypt-tang does: the server's advertisement, a JWS
of its keys, must be signed by every signing key it lists; the first key
for deriving keys is S, and the pin's header holds the advertisement's keys,
the URL, C and the thumbprint of S as `kid`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from ecdsa import curves, ellipticcurve

from .http import Endpoint
from .jose import (
    JoseError,
    b64d,
    b64e,
    clip,
    ecdh_es_key,
    jws_signatures,
    jws_verifies,
    loads,
    thumbprint,
)

_CURVES = {"P-256": curves.NIST256p, "P-384": curves.NIST384p, "P-521": curves.NIST521p}


def _curve(name: Any) -> curves.Curve:
    if name not in _CURVES:
        raise JoseError(f"elliptic curve {name!r} is not supported")
    return _CURVES[name]


def _point(curve: curves.Curve, crv: str, jwk: Any, what: str) -> ellipticcurve.PointJacobi:
    if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != crv:
        raise JoseError(f"{what} is not an EC key on {crv}")
    x, y = int.from_bytes(b64d(jwk.get("x")), "big"), int.from_bytes(b64d(jwk.get("y")), "big")
    if max(x, y) >= curve.curve.p() or not curve.curve.contains_point(x, y):
        raise JoseError(f"{what} is not a point of {crv}")
    return ellipticcurve.PointJacobi.from_affine(ellipticcurve.Point(curve.curve, x, y))


def _jwk(crv: str, point: ellipticcurve.PointJacobi, size: int) -> dict[str, str]:
    p = point.to_affine()
    return {"alg": "ECMR", "crv": crv, "kty": "EC",
            "x": b64e(p.x().to_bytes(size, "big")), "y": b64e(p.y().to_bytes(size, "big"))}


@dataclass(frozen=True)
class TangPin:
    """What a tang pin's JWE header says."""

    url: str
    kid: str
    crv: str
    server_key: dict[str, Any]
    epk: dict[str, Any]

    @classmethod
    def from_header(cls, hdr: dict[str, Any]) -> TangPin:
        clevis = hdr.get("clevis")
        tang = clevis.get("tang") if isinstance(clevis, dict) else None
        if not isinstance(tang, dict) or not isinstance(tang.get("url"), str):
            raise JoseError("the tang pin has no url")
        kid, epk = hdr.get("kid"), hdr.get("epk")
        if not isinstance(kid, str) or not isinstance(epk, dict):
            raise JoseError("the tang pin's JWE has no kid or epk")
        adv = tang.get("adv")
        keys = adv.get("keys") if isinstance(adv, dict) else None
        if not isinstance(keys, list):
            raise JoseError("the tang pin has no advertisement")
        for alg in ("sha256", "sha1"):
            for key in keys:
                if isinstance(key, dict) and key.get("kty") == "EC" \
                        and thumbprint(key, alg) == kid:
                    return cls(tang["url"].rstrip("/"), kid, str(epk.get("crv")), key, epk)
        raise JoseError("no advertised key matches the JWE's kid")


class Recovery:
    """One exchange: `request` is what to POST to `url`; `finish` takes the
    server's answer and gives the content key."""

    def __init__(self, pin: TangPin, header: dict[str, Any]) -> None:
        self.pin = pin
        self.header = header
        self.curve = _curve(pin.crv)
        self.size = (self.curve.curve.p().bit_length() + 7) // 8
        self._e = secrets.randbelow(self.curve.order - 1) + 1
        client = _point(self.curve, pin.crv, pin.epk, "the JWE's epk")
        blinded = client + self.curve.generator * self._e
        self.url = f"{pin.url}/rec/{pin.kid}"
        self.request = json.dumps(_jwk(pin.crv, blinded, self.size)).encode()
        self.endpoint = Endpoint.parse(pin.url, pin.kid)

    def finish(self, reply: bytes) -> bytes:
        jwk = loads(reply, "the Tang server's answer")
        answer = _point(self.curve, self.pin.crv, jwk, "the Tang server's answer")
        server = _point(self.curve, self.pin.crv, self.pin.server_key, "the advertised key")
        shared = (answer + (-(server * self._e))).to_affine()
        self._e = 0
        if shared == ellipticcurve.INFINITY:
            raise JoseError("the Tang server's answer gives no shared key")
        return ecdh_es_key(self.header, shared.x().to_bytes(self.size, "big"))


# The thumbprints clevis takes for a trusted signing key ("thp"): SHA-256
# first, then SHA-1 (clevis-encrypt-tang's CLEVIS_*_THP_ALG*).
THP_HASHES = ("sha256", "sha1")
# What jose's key "use" allows (jose_jwk_prm): key_ops say it otherwise.
_USES = {"sig": ("verify", "sign"), "enc": ("encrypt", "decrypt", "wrapKey", "unwrapKey")}
_EC: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                                    "P-521": ec.SECP521R1()}


def allows(jwk: Any, op: str) -> bool:
    """Whether a key says it may be used for `op` (`jose jwk use -r -u OP`)."""
    if not isinstance(jwk, dict):
        return False
    ops, use = jwk.get("key_ops"), jwk.get("use")
    if isinstance(ops, list) and op in ops:
        return True
    return isinstance(use, str) and op in _USES.get(use, ())


def shown_thp(jwk: dict[str, Any]) -> str:
    try:
        return thumbprint(jwk)
    except JoseError:
        return f"(a key of type {clip(jwk.get('kty'))})"


@dataclass(frozen=True)
class Advertisement:
    """A Tang server's advertisement, verified as clevis verifies it: a JWS
    whose payload is a JWK set, signed by every signing ("verify") key in it."""

    keys: dict[str, Any]  # the payload: what the pin's header holds as "adv"
    signing: tuple[dict[str, Any], ...]

    @classmethod
    def verified(cls, jws: Any) -> Advertisement:
        signatures = jws_signatures(jws)
        keys = loads(b64d(jws["payload"]), "the advertisement's payload")
        if not isinstance(keys, dict) or not isinstance(keys.get("keys"), list):
            raise JoseError("the advertisement's payload is not a JWK set")
        signing = tuple(k for k in keys["keys"] if allows(k, "verify"))
        if not signing:
            raise JoseError("the advertisement has no signing key")
        for key in signing:
            if not jws_verifies(signatures, key):
                raise JoseError(f"the advertisement's signature by its signing key "
                                f"{shown_thp(key)} is missing or wrong")
        return cls(keys, signing)

    def thumbprints(self, alg: str = "sha256") -> list[str]:
        return [thumbprint(k, alg) for k in self.signing]

    def signed_by(self, thp: str) -> bool:
        """Whether `thp` is the thumbprint of a signing key (in any hash clevis takes)."""
        return any(thp in self.thumbprints(alg) for alg in THP_HASHES)

    def exchange_key(self) -> dict[str, Any]:
        """S: the first key for deriving keys, without its key_ops and alg."""
        for key in self.keys["keys"]:
            if allows(key, "deriveKey"):
                return {k: v for k, v in key.items() if k not in ("key_ops", "alg")}
        raise JoseError("the advertisement has no key exchange key")


def binding(url: str, adv: Advertisement) -> tuple[dict[str, Any], bytearray]:
    """A tang pin's JWE header and content key, as clevis-encrypt-tang and
    `jose jwe enc` make them: ECDH-ES (A256GCM) of a fresh key c with S."""
    jwk = adv.exchange_key()
    crv = jwk.get("crv")
    if jwk.get("kty") != "EC" or crv not in _EC:
        raise JoseError(f"the exchange key is not an EC key on a supported curve "
                        f"({clip(crv)})")
    curve = _EC[crv]
    size = (curve.key_size + 7) // 8
    try:
        server = ec.EllipticCurvePublicNumbers(int.from_bytes(b64d(jwk.get("x")), "big"),
                                               int.from_bytes(b64d(jwk.get("y")), "big"),
                                               curve).public_key()
    except ValueError:
        raise JoseError(f"the exchange key is not a point of {crv}") from None
    client = ec.generate_private_key(curve)
    z = bytearray(client.exchange(ec.ECDH(), server))
    c = client.public_key().public_numbers()
    header = {"alg": "ECDH-ES", "enc": "A256GCM", "kid": thumbprint(jwk),
              "epk": {"crv": crv, "kty": "EC", "x": b64e(c.x.to_bytes(size, "big")),
                      "y": b64e(c.y.to_bytes(size, "big"))},
              "clevis": {"pin": "tang", "tang": {"adv": adv.keys, "url": url}}}
    try:
        return header, bytearray(ecdh_es_key(header, bytes(z)))
    finally:
        z[:] = bytes(len(z))
