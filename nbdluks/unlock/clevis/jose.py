"""The JOSE pieces clevis uses, sans I/O: base64url, JWE in its compact and
flattened forms, JWK points and thumbprints, the ECDH-ES Concat KDF, A*GCM
decryption and encryption, and the verifying of a JWS in its JSON forms, a
Tang advertisement (RFC 7515, 7516, 7518, 7638). Crypto from `cryptography`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

from ...errors import NbdluksError

_GCM_KEY_BYTES = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}

# José refuses compressed content larger than 256 KiB; what a clevis pin
# holds (a passphrase, or one share of a key) inflates to far less than the
# 64 KiB allowed here, and the inflating stops as soon as that is passed.
MAX_COMPRESSED = 256 * 1024
MAX_INFLATED = 64 * 1024


class JoseError(NbdluksError):
    """A JWE or JWK that cannot be used (never holds secret material)."""


def b64d(text: Any) -> bytes:
    if not isinstance(text, str):
        raise JoseError("a base64url field is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JoseError("a base64url field is malformed") from None


def clip(value: Any, limit: int = 60) -> str:
    """A value from outside, for a message: its repr on one line, cut short."""
    if isinstance(value, int) and value.bit_length() > 64:
        return "a large number"
    text = repr(value) if isinstance(value, str | int | float | bool | None) \
        else type(value).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def label(value: Any) -> str:
    """A name from outside (a pin's, a token type's), bare when it is short
    printable ASCII, or else clipped."""
    if isinstance(value, str) and len(value) <= 40 and value.isascii() and value.isprintable():
        return value
    return clip(value)


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Jwe:
    protected: str  # base64url, as stored: the AAD of the content encryption
    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes
    tag: bytes

    @property
    def header(self) -> dict[str, Any]:
        hdr = loads(b64d(self.protected), "the JWE protected header")
        if not isinstance(hdr, dict):
            raise JoseError("the JWE protected header is not an object")
        return hdr

    @classmethod
    def parse(cls, jwe: Any) -> Jwe:
        """A compact JWE string or a flattened JSON one (a LUKS2 clevis token's "jwe")."""
        if isinstance(jwe, str):
            parts = jwe.strip().split(".")
            if len(parts) != 5:
                raise JoseError("a compact JWE has 5 parts")
            fields = dict(zip(("protected", "encrypted_key", "iv", "ciphertext", "tag"),
                              parts, strict=True))
        elif isinstance(jwe, dict):
            fields = jwe
        else:
            raise JoseError("the JWE is neither a string nor an object")
        protected = fields.get("protected")
        if not isinstance(protected, str) or not protected:
            raise JoseError("the JWE has no protected header")
        return cls(protected, b64d(fields.get("encrypted_key", "")), b64d(fields.get("iv")),
                   b64d(fields.get("ciphertext")), b64d(fields.get("tag")))

    def decrypt(self, cek: bytes | bytearray) -> bytearray:
        """The plaintext, with the content key `cek` (enc A128/192/256GCM)."""
        hdr = self.header
        enc = hdr.get("enc")
        if enc not in _GCM_KEY_BYTES:
            raise JoseError(f"JWE content encryption {clip(enc)} is not supported")
        if len(cek) != _GCM_KEY_BYTES[enc]:
            raise JoseError("the recovered content key has the wrong size")
        zipped = "zip" in hdr
        if zipped and hdr["zip"] != "DEF":
            raise JoseError(f"JWE compression {clip(hdr['zip'])} is not supported")
        if zipped and len(self.ciphertext) > MAX_COMPRESSED:
            raise JoseError(f"the JWE's compressed content is larger than "
                            f"{MAX_COMPRESSED // 1024} KiB")
        try:
            plain = AESGCM(bytes(cek)).decrypt(self.iv, self.ciphertext + self.tag,
                                               self.protected.encode())
        except (InvalidTag, ValueError):
            raise JoseError("the JWE does not decrypt with the recovered key") from None
        return inflate(plain) if zipped else bytearray(plain)


def loads(data: bytes | str, what: str) -> Any:
    """JSON from outside: anything malformed (or nested too deep) is a JoseError."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise JoseError(f"{what} is not JSON") from None


def inflate(data: bytes) -> bytearray:
    """Raw DEFLATE (RFC 1951) content, refused once it passes MAX_INFLATED bytes:
    no more than that is ever inflated."""
    inflater = zlib.decompressobj(-15)
    try:
        out = inflater.decompress(data, MAX_INFLATED + 1)
    except zlib.error:
        raise JoseError("the JWE's compressed content is not valid DEFLATE") from None
    if len(out) > MAX_INFLATED:
        raise JoseError(f"the JWE's compressed content inflates to more than "
                        f"{MAX_INFLATED // 1024} KiB")
    if not inflater.eof or inflater.unused_data:
        raise JoseError("the JWE's compressed content is truncated or has data past its end")
    return bytearray(out)


def content_key_bytes(header: dict[str, Any]) -> int:
    enc = header.get("enc")
    if enc not in _GCM_KEY_BYTES:
        raise JoseError(f"JWE content encryption {clip(enc)} is not supported")
    return _GCM_KEY_BYTES[enc]


def ecdh_es_key(header: dict[str, Any], z: bytes) -> bytes:
    """ECDH-ES direct key agreement: the content key from the shared secret
    Z (RFC 7518 4.6.2, the Concat KDF with SHA-256)."""
    if header.get("alg") != "ECDH-ES":
        raise JoseError(f"JWE key management {clip(header.get('alg'))} is not ECDH-ES")
    size = content_key_bytes(header)
    enc = str(header["enc"])
    apu = b64d(header["apu"]) if "apu" in header else b""
    apv = b64d(header["apv"]) if "apv" in header else b""
    info = b"".join(len(x).to_bytes(4, "big") + x for x in (enc.encode(), apu, apv))
    info += (size * 8).to_bytes(4, "big")
    return ConcatKDFHash(hashes.SHA256(), size, info).derive(z)


# A key's required members, which its thumbprint hashes (as jose's).
_THP_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}


def thumbprint(jwk: dict[str, Any], alg: str = "sha256") -> str:
    """RFC 7638 thumbprint of an EC (or RSA) public key (clevis also accepts SHA-1)."""
    names = _THP_MEMBERS.get(str(jwk.get("kty")), ())
    if not names or any(k not in jwk for k in names):
        raise JoseError("an advertised key is not an EC or RSA key")
    members = {k: jwk[k] for k in names}
    text = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return b64e(hashlib.new(alg, text.encode()).digest())


def dumps(value: Any) -> str:
    """JSON as jose writes it (jansson's JSON_COMPACT | JSON_SORT_KEYS)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def seal(header: dict[str, Any], cek: bytes | bytearray, plain: bytes | bytearray) -> str:
    """The compact JWE of `plain` under the protected `header`, its content
    encrypted with `cek` (enc A*GCM, no encrypted key: alg "dir" or "ECDH-ES"),
    as `jose jwe enc -c` writes it: a fresh 96-bit IV, a 128-bit tag."""
    if len(cek) != content_key_bytes(header):
        raise JoseError("the content key has the wrong size")
    protected = b64e(dumps(header).encode())
    iv = secrets.token_bytes(12)
    sealed = AESGCM(cek).encrypt(iv, plain, protected.encode())
    return ".".join((protected, "", b64e(iv), b64e(sealed[:-16]), b64e(sealed[-16:])))


# JWS algorithms as jose verifies them: (curve name, its class) for ECDSA.
_ES: dict[str, tuple[str, ec.EllipticCurve]] = {
    "ES256": ("P-256", ec.SECP256R1()), "ES384": ("P-384", ec.SECP384R1()),
    "ES512": ("P-521", ec.SECP521R1()), "ES256K": ("secp256k1", ec.SECP256K1())}
_SHA: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def jws_signatures(jws: Any) -> list[tuple[str, bytes, bytes]]:
    """The signatures of a JWS in its general or flattened JSON form: for
    each, its algorithm, signing input and signature."""
    if not isinstance(jws, dict) or not isinstance(jws.get("payload"), str):
        raise JoseError("the JWS is not an object with a payload")
    sigs = jws.get("signatures", [jws])
    if not isinstance(sigs, list) or not sigs:
        raise JoseError("the JWS has no signatures")
    out = []
    for sig in sigs:
        protected = sig.get("protected") if isinstance(sig, dict) else None
        if not isinstance(protected, str):
            raise JoseError("a JWS signature has no protected header")
        hdr = loads(b64d(protected), "a JWS protected header")
        unprotected = sig.get("header", {})
        if not isinstance(hdr, dict) or not isinstance(unprotected, dict):
            raise JoseError("a JWS header is not an object")
        alg = hdr.get("alg", unprotected.get("alg"))
        out.append((alg if isinstance(alg, str) else "", f"{protected}.{jws['payload']}".encode(),
                    b64d(sig.get("signature"))))
    return out


def jws_verifies(signatures: list[tuple[str, bytes, bytes]], jwk: dict[str, Any]) -> bool:
    """Whether one of the signatures verifies with the public key `jwk`."""
    kalg = jwk.get("alg")
    for alg, data, signature in signatures:
        if (kalg is None or kalg == alg) and _verify(jwk, alg, data, signature):
            return True
    return False


def _verify(jwk: dict[str, Any], alg: str, data: bytes, signature: bytes) -> bool:
    try:
        if alg in _ES and jwk.get("kty") == "EC" and jwk.get("crv") == _ES[alg][0]:
            curve = _ES[alg][1]
            size = (curve.key_size + 7) // 8
            if len(signature) != 2 * size:
                return False
            key = ec.EllipticCurvePublicNumbers(_int(jwk, "x"), _int(jwk, "y"), curve)
            rs = encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                      int.from_bytes(signature[size:], "big"))
            key.public_key().verify(rs, data, ec.ECDSA(_SHA[alg[2:5]]()))
        elif alg[:2] in ("RS", "PS") and alg[2:] in _SHA and jwk.get("kty") == "RSA":
            digest = _SHA[alg[2:]]()
            pad = padding.PKCS1v15() if alg[0] == "R" else \
                padding.PSS(padding.MGF1(digest), padding.PSS.DIGEST_LENGTH)
            rsa.RSAPublicNumbers(_int(jwk, "e"), _int(jwk, "n")).public_key().verify(
                signature, data, pad, digest)
        else:
            return False
    except (InvalidSignature, ValueError, JoseError):
        return False
    return True


def _int(jwk: dict[str, Any], name: str) -> int:
    return int.from_bytes(b64d(jwk.get(name)), "big")
