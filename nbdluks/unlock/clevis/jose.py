"""The JOSE pieces clevis uses, sans I/O: base64url, JWE in its compact and
flattened forms, JWK points and thumbprints, the ECDH-ES Concat KDF and
A*GCM decryption (RFC 7516, 7518, 7638). Crypto from `cryptography`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

from ...errors import NbdluksError

_GCM_KEY_BYTES = {"A128GCM": 16, "A192GCM": 24, "A256GCM": 32}


class JoseError(NbdluksError):
    """A JWE or JWK that cannot be used (never holds secret material)."""


def b64d(text: Any) -> bytes:
    if not isinstance(text, str):
        raise JoseError("a base64url field is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JoseError("a base64url field is malformed") from None


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
        try:
            hdr = json.loads(b64d(self.protected))
        except ValueError:
            raise JoseError("the JWE protected header is not JSON") from None
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
            raise JoseError(f"JWE content encryption {enc!r} is not supported")
        if len(cek) != _GCM_KEY_BYTES[enc]:
            raise JoseError("the recovered content key has the wrong size")
        try:
            plain = AESGCM(bytes(cek)).decrypt(self.iv, self.ciphertext + self.tag,
                                               self.protected.encode())
        except (InvalidTag, ValueError):
            raise JoseError("the JWE does not decrypt with the recovered key") from None
        if hdr.get("zip") == "DEF":
            plain = zlib.decompress(plain, -15)
        return bytearray(plain)


def content_key_bytes(header: dict[str, Any]) -> int:
    enc = header.get("enc")
    if enc not in _GCM_KEY_BYTES:
        raise JoseError(f"JWE content encryption {enc!r} is not supported")
    return _GCM_KEY_BYTES[enc]


def ecdh_es_key(header: dict[str, Any], z: bytes) -> bytes:
    """ECDH-ES direct key agreement: the content key from the shared secret
    Z (RFC 7518 4.6.2, the Concat KDF with SHA-256)."""
    if header.get("alg") != "ECDH-ES":
        raise JoseError(f"JWE key management {header.get('alg')!r} is not ECDH-ES")
    enc = str(header["enc"])
    size = content_key_bytes(header)
    apu = b64d(header["apu"]) if "apu" in header else b""
    apv = b64d(header["apv"]) if "apv" in header else b""
    info = b"".join(len(x).to_bytes(4, "big") + x for x in (enc.encode(), apu, apv))
    info += (size * 8).to_bytes(4, "big")
    return ConcatKDFHash(hashes.SHA256(), size, info).derive(z)


def thumbprint(jwk: dict[str, Any], alg: str = "sha256") -> str:
    """RFC 7638 thumbprint of an EC public key (clevis also accepts SHA-1)."""
    try:
        members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    except KeyError:
        raise JoseError("an advertised key is not an EC key") from None
    text = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return b64e(hashlib.new(alg, text.encode()).digest())
