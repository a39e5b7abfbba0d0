"""The JOSE pieces against the RFCs' own examples and each other."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nbdluks.unlock.clevis.jose import JoseError, Jwe, b64d, b64e, ecdh_es_key, thumbprint


def test_concat_kdf_matches_rfc7518_appendix_c() -> None:
    z = bytes([158, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156,
               251, 49, 110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196])
    hdr = {"alg": "ECDH-ES", "enc": "A128GCM", "apu": "QWxpY2U", "apv": "Qm9i"}
    assert b64e(ecdh_es_key(hdr, z)) == "VqqN6vgjbSBcIijNcacQGg"


def test_thumbprint_matches_rfc7638_shape() -> None:
    # members in lexicographic order, no whitespace: the same key twice gives one print
    key = {"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
           "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0", "alg": "ECMR"}
    assert thumbprint(key) == thumbprint({k: v for k, v in key.items() if k != "alg"})
    with pytest.raises(JoseError):
        thumbprint({"kty": "oct", "k": "x"})


def _jwe(key: bytes, plain: bytes) -> dict[str, str]:
    protected = b64e(b'{"alg":"dir","enc":"A256GCM"}')
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, plain, protected.encode())
    return {"protected": protected, "encrypted_key": "", "iv": b64e(iv),
            "ciphertext": b64e(sealed[:-16]), "tag": b64e(sealed[-16:])}


def test_compact_and_flattened_are_the_same_jwe() -> None:
    key = os.urandom(32)
    flat = _jwe(key, b"the passphrase")
    compact = ".".join(flat[k] for k in ("protected", "encrypted_key", "iv", "ciphertext", "tag"))
    assert Jwe.parse(flat) == Jwe.parse(compact)
    assert Jwe.parse(compact).decrypt(key) == b"the passphrase"


@pytest.mark.parametrize("bad", ["a.b.c", 7, {"iv": "x"}, {"protected": "e30", "iv": "%%"}])
def test_malformed_jwes_are_refused(bad: object) -> None:
    with pytest.raises(JoseError):
        Jwe.parse(bad)


def test_a_wrong_key_or_a_changed_header_fails_to_decrypt() -> None:
    key = os.urandom(32)
    flat = _jwe(key, b"secret")
    with pytest.raises(JoseError, match="does not decrypt"):
        Jwe.parse(flat).decrypt(os.urandom(32))
    flat["protected"] = b64e(b'{"alg":"dir","enc":"A256GCM" }')  # the AAD changed
    with pytest.raises(JoseError, match="does not decrypt"):
        Jwe.parse(flat).decrypt(key)
    assert b64d(b64e(b"\x00\xff")) == b"\x00\xff"
