"""The McCallum-Relyea exchange against an independent ECDH: the key the
blinded recovery yields is the ECDH-ES key of the binding."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

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
