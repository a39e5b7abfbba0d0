"""Header copies: a volume's header may come from several sources, e.g. the header
store and a `cryptsetup luksHeaderBackup` file on another host.

Every source is read at startup. A copy that cannot be reached or is
damaged is logged and passed over; copies of *different* volumes (another
UUID, another volume-key digest) stop the program, since mixing a header
with a payload it does not belong to would serve garbage or, written to,
destroy data. The valid copies are tried in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from ..block import BlockDevice
from ..errors import NbdluksError
from ..luks import (
    DEFAULT_ARGON2_MAX_KIB,
    FIRST_PROBE,
    HEADER_PROBE,
    HeaderError,
    Keyslot,
    LuksError,
    Volume,
    parse_header,
    probe_size,
)
from ..nbd import UpstreamOptions
from .sources import open_source, read_prefix

log = structlog.get_logger("nbdluks.open")


@dataclass
class HeaderCopy:
    source: str
    vol: Volume | None = None
    prefix: bytes = b""
    dev: BlockDevice | None = None  # open until close()
    error: Exception | None = None  # why it cannot be used

    @property
    def problem(self) -> str:
        e = self.error
        return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)

    def read_area(self, slot: Keyslot) -> bytes:
        """A key slot's area: from the bytes read already, or the device."""
        end = slot.area_offset + slot.area_size
        if end <= len(self.prefix):
            return self.prefix[slot.area_offset : end]
        assert self.dev is not None
        buf = bytearray(slot.area_size)
        self.dev.pread_into(memoryview(buf), slot.area_offset)
        return bytes(buf)

    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()
            self.dev = None


def read_header(dev: BlockDevice, argon2_max_kib: int = DEFAULT_ARGON2_MAX_KIB
                ) -> tuple[Volume, bytes]:
    # A healthy header is read in two small reads (1000 volumes must not mean
    # 8 GB read at start); anything a short read does not parse is read again
    # whole, so the verdict is the one the whole probe gives.
    data = read_prefix(dev, FIRST_PROBE)
    need = probe_size(data)
    if need > len(data):
        data = read_prefix(dev, need)
    try:
        vol = parse_header(data, argon2_max_kib=argon2_max_kib)
    except LuksError:
        if len(data) >= min(dev.size, HEADER_PROBE):
            raise
        data = read_prefix(dev, HEADER_PROBE)
        vol = parse_header(data, argon2_max_kib=argon2_max_kib)
    if dev.size < vol.metadata_size:
        raise HeaderError(
            f"the header is truncated: {dev.size} bytes of {vol.metadata_size}"
        )
    return vol, data


def read_copy(source: str, argon2_max_kib: int, upstream: UpstreamOptions) -> HeaderCopy:
    """One source, read and parsed; its problem noted, never raised."""
    copy = HeaderCopy(source)
    try:
        copy.dev = open_source(source, read_only=True, upstream=upstream)
        copy.vol, copy.prefix = read_header(copy.dev, argon2_max_kib)
    except (NbdluksError, OSError) as e:
        copy.error = e
        copy.close()
    return copy


def read_copies(sources: Sequence[str], argon2_max_kib: int,
                upstream: UpstreamOptions) -> list[HeaderCopy]:
    """The valid copies, in order. With one source its error is raised as
    it is; with several, each problem is logged and only none valid, or
    copies of different volumes, raise."""
    copies = [read_copy(s, argon2_max_kib, upstream) for s in sources]
    valid = [c for c in copies if c.vol is not None]
    try:
        if len(sources) == 1 and copies[0].error is not None:
            raise copies[0].error
        for c in copies:
            if c.error is not None:
                log.warning("header copy unusable", source=c.source, error=c.problem)
        if not valid:
            raise HeaderError("no usable header: " + "; ".join(
                f"{c.source}: {c.problem}" for c in copies))
        first = valid[0]
        assert first.vol is not None
        for c in valid[1:]:
            assert c.vol is not None
            if c.vol.identity() != first.vol.identity():
                what = "UUID" if c.vol.uuid != first.vol.uuid else "volume key digest"
                raise HeaderError(f"header copies {first.source} and {c.source} are of "
                                  f"different volumes (their {what} differs): refusing to mix")
    except BaseException:
        for c in copies:
            c.close()
        raise
    return valid
