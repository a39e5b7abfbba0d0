"""A volume served while its key rotates: the boundary shared with the
process that reencrypts it (a seqlock), under that process's scheduling."""

from __future__ import annotations

import errno
import os
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
    gen, done, *_ = boundary.get()
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


def _step_waits(boundary: Any) -> bool:
    """Whether an exclusive request waits for the zone lock (/proc/locks
    lists a blocked request with "->")."""
    ino = os.fstat(boundary.zone._fd).st_ino
    return any("->" in line and "WRITE" in line and f":{ino} " in line
               for line in Path("/proc/locks").read_text().splitlines())


def test_a_write_that_comes_while_a_step_waits_for_its_zone_goes_after_the_step(
        rotating: tuple[OpenVolume, Any, bytes]) -> None:
    """Linux grants a shared OFD lock while an exclusive request waits (no
    writer preference): writes that kept overlapping the zone of a step
    waiting for it would hold it off for as long as they came. One request
    holds the zone; the step waits for it; a write into the zone that comes
    meanwhile waits for the step, which goes as soon as the first is done."""
    _, device, _ = rotating
    boundary = device.boundary
    done: list[str] = []
    in_flight, release = threading.Event(), threading.Event()

    def request_in_flight() -> None:
        with boundary.zone.hold(0, MiB, shared=True):  # as a request holds its range
            in_flight.set()
            release.wait(30)

    def step() -> None:
        with boundary.step(0, 0, MiB):
            done.append("step")

    def write() -> None:
        device.pwrite(b"\xaa" * 4096, 8192)
        done.append("write")

    threads = [threading.Thread(target=request_in_flight)]
    threads[0].start()
    assert in_flight.wait(30)
    threads.append(threading.Thread(target=step))
    threads[1].start()
    deadline = time.monotonic() + 30
    while not _step_waits(boundary):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    threads.append(threading.Thread(target=write))
    threads[2].start()
    threads[2].join(1.0)  # (it would be done by now, had it overtaken the step)
    release.set()
    for t in threads:
        t.join(30)
    assert done == ["step", "write"]
    buf = bytearray(4096)
    device.pread_into(memoryview(buf), 8192)
    assert buf == b"\xaa" * 4096
