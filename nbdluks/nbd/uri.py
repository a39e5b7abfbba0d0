"""NBD URIs (doc/uri.md of NetworkBlockDevice/nbd)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from .constants import DEFAULT_PORT


class UriError(ValueError):
    pass


@dataclass(frozen=True)
class NbdUri:
    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None

    def __str__(self) -> str:
        if self.socket:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def parse_uri(text: str) -> NbdUri:
    parts = urlsplit(text)
    scheme = parts.scheme
    if scheme in ("nbds", "nbds+unix"):
        raise UriError(f"{text}: TLS (nbds) is not supported yet")
    if scheme not in ("nbd", "nbd+unix"):
        raise UriError(f"{text}: not an NBD URI (nbd:// or nbd+unix://)")
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    query = parse_qs(parts.query)
    if scheme == "nbd+unix":
        sockets = query.get("socket")
        if not sockets:
            raise UriError(f"{text}: nbd+unix needs ?socket=PATH")
        if parts.netloc:
            raise UriError(f"{text}: nbd+unix takes no host")
        return NbdUri(export=export, socket=sockets[0])
    if not parts.hostname:
        raise UriError(f"{text}: no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise UriError(f"{text}: bad port") from None
    return NbdUri(export=export, host=parts.hostname, port=port)
