"""Open a volume the way `nbdluks serve` does, for tests that read it directly."""

from __future__ import annotations

from nbdluks.block.base import BlockDevice
from nbdluks.luks.volume import Volume
from nbdluks.unlock.keys import UnlockOptions
from nbdluks.unlock.volume import VolumeConfig, VolumeOptions, open_volume


def open_luks(payload: str, header: str | None, keys: UnlockOptions, *,
              read_only: bool = True) -> tuple[BlockDevice, Volume, int | None]:
    volume = open_volume(VolumeConfig(payload=payload, headers=(header,) if header else (),
                                      keys=keys, options=VolumeOptions(read_only=read_only)))
    assert volume.header is not None
    return volume.device(), volume.header, volume.keyslot
