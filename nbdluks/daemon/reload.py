"""SIGHUP with a configuration file: read it again and work out what
changes, as a diff against what is served: an unchanged export keeps its
open volume (and its clients never notice), an added one is unlocked, a
removed one is retired, a changed one is unlocked anew and replaces the one
served once ready (a removal plus an addition). An export that could not be
unlocked before is tried again. A file that cannot be read or checked
changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from ..errors import NbdluksError
from ..unlock import OpenVolume, VolumeConfig

log = structlog.get_logger("nbdluks")

# How SIGHUP gets the configuration anew (raises NbdluksError when it cannot).
Reread = Callable[[], Sequence[VolumeConfig]]


@dataclass(frozen=True)
class Plan:
    order: list[str]  # every export of the file, in its order
    removed: list[str]  # served, and not in the file any more
    changed: list[str]  # served, and in the file with another configuration
    to_open: list[VolumeConfig]  # added, changed, or failed before


def diff(served: Mapping[str, OpenVolume], reread: Reread) -> Plan | None:
    """What the file now asks for, against what is `served`; None when
    the file cannot be read (logged)."""
    try:
        configs = reread()
    except NbdluksError as e:
        log.error("configuration not reloaded", error=str(e), serving="the one in use")
        return None
    names = {c.name for c in configs}
    kept = {c.name for c in configs if c.name in served and served[c.name].config == c}
    return Plan(order=[c.name for c in configs],
                removed=[n for n in served if n not in names],
                changed=[c.name for c in configs if c.name in served and c.name not in kept],
                to_open=[c for c in configs if c.name not in kept])
