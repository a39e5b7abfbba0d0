"""The McCallum-Relyea exchange of a Tang pin, sans I/O.

At binding, clevis made an ephemeral key c, put C = cG in the JWE as `epk`
and encrypted with the ECDH-ES secret of c and the server's key S = sG.
To recover it we blind C with a fresh E = eG: the server sees only C + E,
answers s(C + E), and s(C + E) - eS = sC = cS is the shared point; the
server never learns it. The point arithmetic, which `cryptography` does not
expose, comes from the `ecdsa` package.

The request and its answer travel over HTTP (http.py).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from ecdsa import curves, ellipticcurve

from .http import Endpoint
from .jose import JoseError, b64d, b64e, ecdh_es_key, loads, thumbprint

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
