"""SIGHUP with a configuration file: read it again and work out the next
set of volumes, as a diff of the two: an unchanged export keeps its open
volume (and its clients never notice), an added one is unlocked, a removed
or changed one is retired (a changed one is a removal plus an addition).
An export that could not be unlocked before is tried again. A file that
cannot be read or checked changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from ..errors import NbdluksError
from ..unlock import OpenVolume, VolumeConfig, open_volumes

log = structlog.get_logger("nbdluks")

# How SIGHUP gets the configuration anew (raises NbdluksError when it cannot).
Reread = Callable[[], Sequence[VolumeConfig]]


@dataclass(frozen=True)
class Plan:
    volumes: list[OpenVolume]  # the next set, in the file's order
    retired: list[str]  # exports whose connections close (removed or changed)
    added: list[str]
    failed: list[str]


def prepare(current: Sequence[OpenVolume], reread: Reread, unlockers: int,
            processes: int) -> Plan | None:
    """The next set of volumes (new ones unlocked and ready to fork), or
    None when the configuration cannot be read. With several `processes`, a
    new volume whose NBD source lacks multi-conn is not served: a FLUSH
    through one process's connection would not cover another's writes."""
    try:
        configs = reread()
    except NbdluksError as e:
        log.error("configuration not reloaded", error=str(e), serving="the one in use")
        return None
    by_name = {v.name: v for v in current}
    kept = {c.name for c in configs if c.name in by_name and by_name[c.name].config == c}
    opened, failed = open_volumes([c for c in configs if c.name not in kept], unlockers)
    new: dict[str, OpenVolume] = {}
    refused: list[str] = []
    for volume in opened:
        if processes > 1 and not volume.multi_process:
            log.error("export not served", export=volume.name, kind="MultiConnError",
                      error=f"its NBD source does not allow multi-conn, and {processes} "
                      "processes serve")
            refused.append(volume.name)
            volume.close()
        else:
            volume.before_fork()
            new[volume.name] = volume
    return Plan(
        volumes=[by_name[c.name] if c.name in kept else new[c.name]
                 for c in configs if c.name in kept or c.name in new],
        retired=[v.name for v in current if v.name not in kept],
        added=list(new), failed=sorted([*failed, *refused]))
