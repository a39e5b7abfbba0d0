"""NBD URIs (doc/uri.md of NetworkBlockDevice/nbd)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import NbdluksError
from .constants import DEFAULT_PORT

SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")


class UriError(NbdluksError, ValueError):
    """Not an NBD URI we can use."""


def is_nbd_uri(spec: str) -> bool:
    """Whether a source names an NBD export (else: a path)."""
    return spec.startswith(tuple(f"{s}://" for s in SCHEMES))


@dataclass(frozen=True)
class NbdUri:
    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    # nbds: STARTTLS first; the query's tls-certificates, tls-verify-peer
    # and tls-hostname as libnbd reads them.
    tls: bool = False
    tls_certificates: str | None = None
    tls_verify: bool = True
    tls_hostname: str | None = None

    def __str__(self) -> str:
        s = "s" if self.tls else ""
        if self.socket:
            return f"nbd{s}+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd{s}://{host}:{self.port}/{self.export}"


def parse_uri(text: str) -> NbdUri:
    try:
        parts = urlsplit(text)
    except ValueError as e:  # e.g. an unclosed [IPv6 address
        raise UriError(f"{text}: {e}") from None
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise UriError(f"{text}: not an NBD URI ({', '.join(f'{s}://' for s in SCHEMES)})")
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    query = parse_qs(parts.query)
    tls = scheme.startswith("nbds")
    verify = query.get("tls-verify-peer", ["true"])[0].lower()
    if verify not in ("true", "false", "1", "0", "yes", "no"):
        raise UriError(f"{text}: tls-verify-peer must be true or false")
    base = NbdUri(
        export=export, tls=tls, tls_certificates=query.get("tls-certificates", [None])[0],
        tls_verify=verify in ("true", "1", "yes"),
        tls_hostname=query.get("tls-hostname", [None])[0],
    )
    if not tls and any(k.startswith("tls-") for k in query):
        raise UriError(f"{text}: tls-* parameters need nbds:// or nbds+unix://")
    if scheme.endswith("+unix"):
        sockets = query.get("socket")
        if not sockets:
            raise UriError(f"{text}: {scheme} needs ?socket=PATH")
        if parts.netloc:
            raise UriError(f"{text}: {scheme} takes no host")
        return replace(base, socket=sockets[0])
    if not parts.hostname:
        raise UriError(f"{text}: no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UriError(f"{text}: bad port") from None
    return replace(base, host=parts.hostname, port=port)
