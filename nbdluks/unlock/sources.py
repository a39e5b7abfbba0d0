"""Open a source given on the command line: a path or an NBD URI."""

from __future__ import annotations

from ..block import BlockDevice, FileDevice
from ..errors import NbdluksError
from ..nbd import NbdClientError, NbdDevice, UpstreamOptions, UriError, is_nbd_uri, parse_uri


class SourceError(NbdluksError):
    """A source that cannot be opened."""


def open_source(spec: str, *, read_only: bool,
                upstream: UpstreamOptions | None = None) -> BlockDevice:
    if is_nbd_uri(spec):
        try:
            return NbdDevice(parse_uri(spec), read_only=read_only,
                             options=upstream or UpstreamOptions())
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
