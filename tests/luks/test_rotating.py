"""A volume served while its key rotates: the boundary shared with the
process that reencrypts it (a seqlock), under that process's scheduling."""

from __future__ import annotations

import errno
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdluks.unlock import OpenVolume, UnlockOptions, VolumeConfig, VolumeOptions, open_volume
from tests.conftest import need, pattern
from tests.luks.reference import fill, luks_format

MiB = 1 << 20


@pytest.fixture
def rotating(tmp_path: Path) -> Iterator[tuple[OpenVolume, Any, bytes]]:
    """A LUKS2 volume whose reencryption began (nothing rewritten yet),
    opened as `serve --reencrypt` opens it: (volume, its device, data)."""
    need("cryptsetup")
    made = luks_format(tmp_path, name="r", size=20 * MiB)  # 4 MiB of data
    plain = pattern(4 * MiB, seed=4)
    fill(made, plain)
    key = str(tmp_path / "r.pass")
    subprocess.run([sys.executable, "-m", "nbdluks", "reencrypt", "--init-only", "--payload",
                    str(made.payload), "--key-file", key], check=True, capture_output=True)
    opened = open_volume(VolumeConfig(name="r", payload=str(made.payload),
                                      keys=UnlockOptions(key_file=key),
                                      options=VolumeOptions(reencrypting=True)))
    device = opened.device()
    try:
        yield opened, device, plain
    finally:
        device.close()
        opened.close()


def test_a_read_waits_for_a_publisher_descheduled_between_its_stores(
        rotating: tuple[OpenVolume, Any, bytes]) -> None:
    """The reencrypting process moves the boundary in three stores; starved
    of CPU, it may sit between them for longer than a reader spins (it was
    ~40 ms, then the read answered EIO). The read waits and is right."""
    _, device, plain = rotating
    boundary = device.boundary
    gen, done, _, _ = boundary.get()
    boundary.cells.set(gen + 1)  # the first store; then descheduled for 0.5 s

    def rest() -> None:
        boundary.cells.set(done, 0, 0, at=1)
        boundary.cells.set(gen + 2)

    timer = threading.Timer(0.5, rest)
    timer.start()
    began = time.monotonic()
    try:
        buf = bytearray(MiB)
        device.pread_into(memoryview(buf), MiB)
    finally:
        timer.join()
    assert buf == plain[MiB : 2 * MiB]
    assert time.monotonic() - began >= 0.4


def test_a_publisher_that_died_between_its_stores_is_eio_after_a_while(
        rotating: tuple[OpenVolume, Any, bytes]) -> None:
    """A generation left odd for good (the process died mid-publish): what
    the zone holds is unknown, so every request answers EIO, after a wait
    of seconds, not minutes."""
    _, device, _ = rotating
    boundary = device.boundary
    boundary.cells.set(boundary.generation() + 1)
    began = time.monotonic()
    with pytest.raises(OSError) as raised:
        device.pread_into(memoryview(bytearray(4096)), 0)
    assert raised.value.errno == errno.EIO
    assert time.monotonic() - began < 30
