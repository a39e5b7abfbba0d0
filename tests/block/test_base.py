"""The BlockDevice contract, checked once in the base class: what reaches a
device's own methods is always a valid request."""

from __future__ import annotations

import errno

import pytest

from nbdluks.block.base import Capabilities, Extent
from tests.block.memory import MemoryDevice


def oserror(fn: object, *args: object, **kw: object) -> int:
    with pytest.raises(OSError) as e:
        fn(*args, **kw)  # type: ignore[operator]
    assert e.value.errno is not None
    return e.value.errno


def test_ranges_outside_the_device_never_reach_it() -> None:
    dev = MemoryDevice(4096)
    buf = memoryview(bytearray(512))
    for offset in (-1, 4096 - 511, 4096):
        assert oserror(dev.pread_into, buf, offset) == errno.EINVAL
        assert oserror(dev.pwrite, b"x" * 512, offset) == errno.EINVAL
        assert oserror(dev.write_zeroes, offset, 512) == errno.EINVAL
        assert oserror(dev.trim, offset, 512) == errno.EINVAL
        assert oserror(dev.cache, offset, 512) == errno.EINVAL
        assert oserror(dev.extents, offset, 512) == errno.EINVAL
    assert dev.calls == []
    dev.pread_into(buf, 4096 - 512)
    assert dev.calls == [("read", 3584, 512)]


def test_read_only_refuses_every_write_with_eperm() -> None:
    dev = MemoryDevice(4096, Capabilities(flush=True, cache=True))
    assert oserror(dev.pwrite, b"x", 0) == errno.EPERM
    assert oserror(dev.write_zeroes, 0, 1) == errno.EPERM
    assert oserror(dev.trim, 0, 1) == errno.EPERM
    assert dev.calls == []


def test_missing_capabilities_are_refused_not_passed_through() -> None:
    dev = MemoryDevice(4096, Capabilities(writable=True))
    assert oserror(dev.flush) == errno.EOPNOTSUPP
    assert oserror(dev.trim, 0, 512) == errno.EOPNOTSUPP
    assert oserror(dev.write_zeroes, 0, 512) == errno.EOPNOTSUPP
    assert oserror(dev.cache, 0, 512) == errno.EOPNOTSUPP
    assert oserror(dev.pwrite, b"x", 0, fua=True) == errno.EOPNOTSUPP  # no FUA, no flush
    assert dev.calls == []
    zero_only = MemoryDevice(4096, Capabilities(writable=True, zero=True))
    assert oserror(zero_only.write_zeroes, 0, 512, fast=True) == errno.EOPNOTSUPP
    assert zero_only.calls == []


def test_fua_is_passed_on_or_emulated_with_a_flush() -> None:
    native = MemoryDevice(4096)
    native.pwrite(b"a", 0, fua=True)
    native.trim(0, 512, fua=True)
    assert native.calls == [("write", 0, 1, True), ("trim", 0, 512, True)]
    emulated = MemoryDevice(4096, Capabilities(writable=True, flush=True, trim=True, zero=True))
    emulated.pwrite(b"a", 0, fua=True)
    emulated.write_zeroes(0, 512, fua=True)
    emulated.trim(0, 512, fua=True)
    assert emulated.calls == [("write", 0, 1, False), ("flush",),
                              ("zero", 0, 512, False, False, False), ("flush",),
                              ("trim", 0, 512, False), ("flush",)]


def test_extents_only_where_the_device_reports_them() -> None:
    dev = MemoryDevice(8192)
    dev.holes = [(4096, 4096)]
    assert dev.extents(0, 8192) == [Extent(4096), Extent(4096, hole=True, zero=True)]
    assert dev.read_extents(0, 8192) is not None
    blind = MemoryDevice(8192, Capabilities(writable=True))
    blind.holes = [(4096, 4096)]
    assert blind.extents(0, 8192) == [Extent(8192)]
    assert blind.read_extents(0, 8192) is None
