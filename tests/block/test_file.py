from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nbdluks.block import file
from nbdluks.block.file import FileDevice

MiB = 1 << 20


@pytest.fixture
def dev(tmp_path: Path):  # type: ignore[no-untyped-def]
    p = tmp_path / "f.img"
    p.write_bytes(b"\x77" * (4 * MiB))
    with FileDevice(str(p)) as d:
        yield d


def read(dev: FileDevice, off: int, n: int) -> bytes:
    buf = bytearray(n)
    dev.pread_into(memoryview(buf), off)
    return bytes(buf)


def test_read_write_flush(dev: FileDevice) -> None:
    assert dev.size == 4 * MiB and dev.caps.writable and dev.caps.multi_conn
    dev.pwrite(b"abc", 10, fua=True)
    dev.flush()
    assert read(dev, 8, 7) == b"\x77\x77abc\x77\x77"


def test_zeroes_and_trim_make_holes(dev: FileDevice) -> None:
    dev.write_zeroes(MiB, MiB, may_trim=True)
    assert read(dev, MiB, MiB) == bytes(MiB)
    dev.write_zeroes(2 * MiB, 4096, fast=True)
    assert read(dev, 2 * MiB, 4096) == bytes(4096)
    dev.trim(3 * MiB, MiB)
    assert read(dev, 3 * MiB, MiB) == bytes(MiB)  # a punched hole reads as zeroes
    ext = dev.extents(0, 4 * MiB)
    assert sum(e.length for e in ext) == 4 * MiB
    assert ext[0].hole is False and ext[1].hole and ext[1].zero


def test_read_only_and_truncation(tmp_path: Path) -> None:
    p = tmp_path / "r.img"
    p.write_bytes(bytes(8192))
    with FileDevice(str(p), read_only=True) as d:
        assert not d.caps.writable and not d.caps.trim
        with pytest.raises(OSError) as e:
            d.pwrite(b"x", 0)
        assert e.value.errno == errno.EPERM  # the contract refuses it before the fd could
        p.write_bytes(bytes(100))  # shrunk underneath us
        with pytest.raises(OSError) as e:
            read(d, 0, 8192)
        assert e.value.errno == errno.EIO


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a regular file"):
        FileDevice(str(tmp_path), read_only=True)
    with pytest.raises(OSError, match="Is a directory"):
        FileDevice(str(tmp_path))


def test_read_extents_only_for_large_reads_and_not_while_probing_is_slow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "sparse.img"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\x11" * 65536)
    monkeypatch.setattr(file, "_PROBE_SLOW", 10.0)  # however slow this machine is
    with FileDevice(str(p)) as d:
        assert d.read_extents(0, 4096) is None  # a small read: zeroes cost less
        ext = d.read_extents(0, MiB)
        assert ext is not None and [(e.length, e.hole) for e in ext] == [
            (65536, False), (MiB - 65536, True)]
        monkeypatch.setattr(file, "_PROBE_SLOW", -1.0)  # every probe now counts as slow
        assert d.read_extents(0, MiB) is not None
        assert d.read_extents(0, MiB) is None  # backed off
        assert d.extents(0, MiB) == ext  # BLOCK_STATUS still asks
