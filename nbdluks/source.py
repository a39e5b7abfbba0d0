"""Open a source given on the command line: a path or an NBD URI."""

from __future__ import annotations

from dataclasses import dataclass

from .block.base import BlockDevice
from .block.file import FileDevice
from .errors import NbdluksError


class SourceError(NbdluksError):
    """A source that cannot be opened."""


def is_nbd_uri(spec: str) -> bool:
    return spec.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


# Seconds an upstream NBD server may take to answer a request before its
# connection is declared dead (every request on it then fails with EIO).
DEFAULT_UPSTREAM_TIMEOUT = 60.0


@dataclass(frozen=True)
class UpstreamOptions:
    """How NBD sources are treated: `timeout` seconds for an answer, then
    `reconnect` seconds to get a connection back (0: fail with EIO)."""

    timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    reconnect: float = 0.0


DEFAULT_UPSTREAM = UpstreamOptions()


def open_source(spec: str, *, read_only: bool,
                upstream: UpstreamOptions = DEFAULT_UPSTREAM) -> BlockDevice:
    if is_nbd_uri(spec):
        from .nbd.client import NbdClientError
        from .nbd.upstream import NbdDevice
        from .nbd.uri import UriError, parse_uri

        try:
            return NbdDevice(parse_uri(spec), read_only=read_only,
                             request_timeout=upstream.timeout, reconnect=upstream.reconnect)
        except (NbdClientError, UriError) as e:
            raise SourceError(str(e)) from None
    try:
        return FileDevice(spec, read_only=read_only)
    except OSError as e:
        raise SourceError(f"{spec}: {e.strerror}") from None


def read_prefix(dev: BlockDevice, limit: int) -> bytes:
    n = min(limit, dev.size)
    buf = bytearray(n)
    dev.pread_into(memoryview(buf), 0)
    return bytes(buf)
