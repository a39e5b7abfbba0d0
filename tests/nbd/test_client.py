"""The upstream client against a real server (nbdkit)."""

from __future__ import annotations

import errno
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdluks.block.nbd import NbdDevice
from nbdluks.nbd.client import NbdClientError
from nbdluks.nbd.uri import NbdUri
from tests.conftest import need, wait_listening

MiB = 1 << 20


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[object]:
    need("nbdkit")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> NbdUri:
        sock = str(tmp_path / f"k{len(procs)}.sock")
        log = tmp_path / f"k{len(procs)}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(["nbdkit", "-f", "-U", sock, *args], stdout=f,
                                 stderr=subprocess.STDOUT)
        procs.append(p)
        wait_listening(p, sock, None, log)
        return NbdUri("", socket=sock)

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_read_write_flush_zero_trim_and_pipelining(nbdkit) -> None:  # type: ignore[no-untyped-def]
    dev = NbdDevice(nbdkit("memory", "64M"))
    try:
        assert dev.size == 64 * MiB and dev.caps.writable and dev.caps.flush
        dev.pwrite(b"\x42" * (40 * MiB), 0, fua=True)  # larger than one request: split
        buf = bytearray(40 * MiB)
        dev.pread_into(memoryview(buf), 0)
        assert buf == b"\x42" * (40 * MiB)
        dev.write_zeroes(MiB, MiB)
        dev.trim(2 * MiB, MiB)
        dev.flush()
        out = bytearray(4096)
        dev.pread_into(memoryview(out), MiB)
        assert out == bytes(4096)

        def worker(k: int) -> None:
            for i in range(50):
                off = (k * 50 + i) * 4096
                dev.pwrite(bytes([k + 1]) * 4096, off)
                b = bytearray(4096)
                dev.pread_into(memoryview(b), off)
                assert b == bytes([k + 1]) * 4096

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        dev.close()


def test_upstream_errors_keep_their_errno(nbdkit) -> None:  # type: ignore[no-untyped-def]
    dev = NbdDevice(nbdkit("--filter=error", "memory", "1M", "error-pread=EIO",
                           "error-pread-rate=1", "error-pwrite=ENOSPC",
                           "error-pwrite-rate=1"))
    try:
        with pytest.raises(OSError) as e:
            dev.pread_into(memoryview(bytearray(512)), 0)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            dev.pwrite(b"x" * 512, 0)
        assert e.value.errno == errno.ENOSPC
    finally:
        dev.close()


def test_read_only_upstream_and_missing_export(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--readonly", "memory", "1M")
    dev = NbdDevice(uri)
    try:
        assert not dev.caps.writable
        with pytest.raises(OSError) as e:
            dev.pwrite(b"x", 0)
        assert e.value.errno == errno.EPERM
    finally:
        dev.close()
    with pytest.raises(NbdClientError, match="cannot connect"):
        NbdDevice(NbdUri("", socket="/nonexistent.sock"))
