"""Open a volume the way `nbdluks serve` does, for tests that read it directly."""

from __future__ import annotations

from nbdluks.luks.device import LuksDevice
from nbdluks.luks.volume import Volume
from nbdluks.unlock.opener import UnlockOptions, VolumeOptions, unlock_volume


def open_luks(payload: str, header: str | None, keys: UnlockOptions, *,
              read_only: bool = True) -> tuple[LuksDevice, Volume, int | None]:
    opened = unlock_volume(payload, [header] if header else [], keys,
                           VolumeOptions(read_only=read_only))
    try:
        dev = opened.device()
        assert isinstance(dev, LuksDevice)
        return dev, opened.vol, opened.keyslot
    finally:
        opened.wipe()
