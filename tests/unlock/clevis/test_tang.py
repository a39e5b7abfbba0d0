"""The McCallum-Relyea exchange against an independent ECDH: the key the
blinded recovery yields is the ECDH-ES key of the binding."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from nbdluks.unlock.clevis.http import Answer, Endpoint
from nbdluks.unlock.clevis.jose import JoseError, b64d, b64e, ecdh_es_key, thumbprint
from nbdluks.unlock.clevis.tang import Recovery, TangPin

CURVES = {"P-256": (ec.SECP256R1(), 32), "P-384": (ec.SECP384R1(), 48),
          "P-521": (ec.SECP521R1(), 66)}


def jwk(key: ec.EllipticCurvePublicKey, crv: str, size: int) -> dict[str, str]:
    n = key.public_numbers()
    return {"kty": "EC", "crv": crv, "x": b64e(n.x.to_bytes(size, "big")),
            "y": b64e(n.y.to_bytes(size, "big"))}


@pytest.mark.parametrize("crv", list(CURVES))
def test_recovery_yields_the_binding_key(crv: str) -> None:
    curve, size = CURVES[crv]
    server = ec.generate_private_key(curve)  # the Tang server's exchange key s
    client = ec.generate_private_key(curve)  # clevis's ephemeral key c at binding
    s_jwk = {**jwk(server.public_key(), crv, size), "alg": "ECMR"}
    hdr = {"alg": "ECDH-ES", "enc": "A256GCM", "kid": thumbprint(s_jwk),
           "epk": jwk(client.public_key(), crv, size),
           "clevis": {"pin": "tang", "tang": {"url": "http://t/", "adv": {"keys": [s_jwk]}}}}
    expected = ecdh_es_key(hdr, client.exchange(ec.ECDH(), server.public_key()))

    rec = Recovery(TangPin.from_header(hdr), hdr)
    assert rec.url == f"http://t/rec/{hdr['kid']}"
    sent = json.loads(rec.request)
    assert sent["kty"] == "EC" and sent["crv"] == crv
    assert sent["x"] != hdr["epk"]["x"]  # blinded: the server never sees C
    # the server multiplies what it got by s (an EC point times a scalar)
    x = ec.EllipticCurvePublicNumbers(int.from_bytes(b64d(sent["x"]), "big"),
                                      int.from_bytes(b64d(sent["y"]), "big"), curve)
    answer = _mul(server, x.public_key(), crv, size)
    assert rec.finish(json.dumps(answer).encode()) == expected


def _mul(s: ec.EllipticCurvePrivateKey, point: ec.EllipticCurvePublicKey, crv: str,
         size: int) -> dict[str, str]:
    """s * point, with full coordinates (ECDH gives only x): from the ecdsa package,
    independently of the code under test's use of it."""
    from ecdsa import curves, ellipticcurve

    cv = {"P-256": curves.NIST256p, "P-384": curves.NIST384p, "P-521": curves.NIST521p}[crv]
    n = point.public_numbers()
    p = ellipticcurve.Point(cv.curve, n.x, n.y) * s.private_numbers().private_value
    return {"kty": "EC", "crv": crv, "x": b64e(p.x().to_bytes(size, "big")),
            "y": b64e(p.y().to_bytes(size, "big"))}


def test_a_kid_that_matches_no_advertised_key() -> None:
    key = ec.generate_private_key(ec.SECP521R1()).public_key()
    hdr = {"kid": "nope", "epk": jwk(key, "P-521", 66),
           "clevis": {"tang": {"url": "http://t", "adv": {"keys": [jwk(key, "P-521", 66)]}}}}
    with pytest.raises(JoseError, match="no advertised key matches"):
        TangPin.from_header(hdr)


def test_endpoints_as_curl_takes_clevis_urls() -> None:
    ep = Endpoint.parse("tang.example:7500", "KID")  # no scheme: http
    assert (ep.tls, ep.host, ep.port, ep.authority, ep.target) \
        == (False, "tang.example", 7500, "tang.example:7500", "/rec/KID")
    ep = Endpoint.parse("HTTPS://[::1]/base/", "KID")
    assert (ep.tls, ep.host, ep.port, ep.authority, ep.target) \
        == (True, "::1", 443, "[::1]", "/base/rec/KID")
    assert ep.request(b"{}") == (b"POST /base/rec/KID HTTP/1.1\r\nHost: [::1]\r\n"
                                 b"Content-Type: application/jwk+json\r\n"
                                 b"Accept: application/jwk+json\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\n{}")
    for bad in ("file:///etc/passwd", "gopher://t/", "http://t t/", "http://t/\x00", ""):
        with pytest.raises(JoseError):
            Endpoint.parse(bad, "KID")


BODY = b'{"kty": "EC"}'


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n" + BODY,
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n5;ext=1\r\n" + BODY[:5]
    + b"\r\n8\r\n" + BODY[5:] + b"\r\n0\r\nTrailer: x\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: application/jwk+json\r\n\r\n" + BODY,
], ids=["interim-then-length", "chunked", "to-the-end"])
def test_answers_fed_byte_by_byte(raw: bytes) -> None:
    answer = Answer()
    for i in range(len(raw)):
        if answer.feed(raw[i:i + 1]):
            break
    else:
        answer.end()
    assert answer.complete and bytes(answer.body) == BODY
