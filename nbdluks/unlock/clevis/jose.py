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


def thumbprint(jwk: dict[str, Any], alg: str = "sha256") -> str:
    """RFC 7638 thumbprint of an EC public key (clevis also accepts SHA-1)."""
    try:
        members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    except KeyError:
        raise JoseError("an advertised key is not an EC key") from None
    text = json.dumps(members, separators=(",", ":"), sort_keys=True)
    return b64e(hashlib.new(alg, text.encode()).digest())
