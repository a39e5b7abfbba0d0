"""The reencryption of a served volume, in a process of its own beside the
server's (a single volume's or a configuration's exports that rotate): the
server's rotator (daemon/rotator.py) calls `open_rotating` to open such an
export and `rotate_beside` in the process it forks for it, which shares the
device's boundary and zone lock with every worker; it is stopped between
two steps when the server stops, and killed with the server (a crash,
recovered at the next start, never a half-done step taken for a whole one)."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import structlog

from ..unlock import MemoryGate, OpenVolume, VolumeConfig, open_volume, secret_once
from .reencrypt import ReencryptOptions, reencrypt, run_beside
from .target import Target

log = structlog.get_logger("nbdluks")


def target_of(config: VolumeConfig) -> Target:
    assert config.payload is not None
    return Target((config.headers or (config.payload,))[0], config.options.upstream,
                  config.keys.argon2_max_kib)


def _options(config: VolumeConfig) -> ReencryptOptions:
    assert config.rotate is not None
    return ReencryptOptions(resilience=config.rotate.resilience,
                            hotzone_size=config.rotate.hotzone_size)


def open_rotating(config: VolumeConfig, gate: MemoryGate | None, earlier: Any,
                  first: bool) -> OpenVolume:
    """An export whose key is rotated while served: the reencryption
    started (`first`: the export's first opening by this server; later ones
    only go on with one in progress) or an interrupted step recovered, then
    opened. `earlier`: (uuid, boundary or None) of the version served now,
    whose reencryption lock the server holds and whose reencryption was
    stopped: the same volume shares that boundary, so that the requests it
    still drains and the new steps exclude each other."""
    assert config.payload is not None
    with secret_once(config.keys) as keys:
        progress = reencrypt(target_of(config), config.payload, keys, _options(config),
                             settle_only=True, may_start=first,
                             held=None if earlier is None else earlier[0])
        shared: dict[str, Any] = {}
        if not progress.finished and earlier is not None and earlier[0] == progress.uuid \
                and earlier[1] is not None:
            earlier[1].publish(progress.done)
            shared["boundary"] = earlier[1]
        volume = open_volume(replace(config, keys=keys, options=replace(
            config.options, reencrypting=True)), gate, **shared)
    volume.config = config  # what the file says (a reload compares it)
    return volume


def rotate_beside(volume: OpenVolume) -> int:
    """In the process forked for it: the export's reencryption moved on to
    its end (or a stop); the exit status."""
    config = volume.config
    assert config.rotate is not None and config.payload is not None
    dev = volume.template
    assert dev is not None
    log.info("reencryption running beside the server", export=config.name, pid=os.getpid(),
             rate_mib_s=config.rotate.rate and config.rotate.rate / 2**20)
    return run_beside(target_of(config), config.payload, dev, _options(config),
                      config.rotate.rate)
