"""TLS credentials, laid out as qemu-nbd, nbdkit and libnbd expect them: a
directory holding ca-cert.pem, and server-cert.pem + server-key.pem (a
server) or client-cert.pem + client-key.pem (a client with a certificate)."""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import NbdluksError


class TlsConfigError(NbdluksError):
    """The credentials cannot be used (a one-line reason)."""


class TlsFileMissingError(TlsConfigError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: no such file")
        self.path = path


def server_context(cert_dir: str, verify_peer: bool = False) -> ssl.SSLContext:
    d = Path(cert_dir)
    cert, key, ca = d / "server-cert.pem", d / "server-key.pem", d / "ca-cert.pem"
    for f in (cert, key, *((ca,) if verify_peer else ())):
        if not f.is_file():
            raise TlsFileMissingError(f)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        # The key's contents never reach the message: only the file names.
        raise TlsConfigError(f"cannot use {cert} with {key}: {_why(e)}") from None
    if verify_peer:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise TlsConfigError(f"cannot use {ca}: {_why(e)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class ServerCredentials:
    """The server's TLS context, read again from its directory on request
    (SIGHUP): connections made afterwards use the new certificates, those
    already made keep theirs."""

    def __init__(self, cert_dir: str, verify_peer: bool = False) -> None:
        self.cert_dir = cert_dir
        self.verify_peer = verify_peer
        self.context = server_context(cert_dir, verify_peer)

    def reload(self) -> None:
        """Replace the context; on failure (TlsConfigError) the old one stays."""
        self.context = server_context(self.cert_dir, self.verify_peer)


def client_context(cert_dir: str | None, verify: bool = True) -> ssl.SSLContext:
    """For upstream connections: the server is checked against
    DIR/ca-cert.pem (the system's CAs without DIR) unless `verify` is off;
    DIR/client-cert.pem and client-key.pem are presented when present."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    d = Path(cert_dir) if cert_dir else None
    if d is not None and not d.is_dir():
        raise TlsConfigError(f"{d}: no such directory")
    try:
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif d is not None and (d / "ca-cert.pem").is_file():
            ctx.load_verify_locations(cafile=d / "ca-cert.pem")
        else:
            ctx.load_default_certs()
        if d is not None and (d / "client-cert.pem").is_file():
            ctx.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
    except (OSError, ssl.SSLError) as e:
        raise TlsConfigError(f"cannot use the certificates in {d}: {_why(e)}") from None
    return ctx


def _why(e: OSError) -> str:
    return str(getattr(e, "reason", None) or e.strerror or type(e).__name__)


def subject_cn(cert: dict[str, object]) -> str | None:
    """The common name of a certificate's subject, for the log."""
    for rdn in cert.get("subject", ()):  # type: ignore[attr-defined]
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def peer_str(peer: object) -> str:
    """A connection's peer address, for the log."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer else "unix"
