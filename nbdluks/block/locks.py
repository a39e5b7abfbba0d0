"""Byte-range locks shared by threads and worker processes, released by the
kernel when their holder dies.

A read-modify-write of a partial sector must not interleave with another
on the same sector, in this process or in a sibling worker. A
multiprocessing lock would do, but a worker killed while holding one
leaves it held forever, and every other worker then blocks on it. Open file
description (OFD) locks on a memfd do not have that flaw: the kernel drops
a lock when the last descriptor of its open file description closes, and a
dying process closes all of its own. They also lock only the sectors a
write touches, so unrelated partial writes do not wait for each other.

Each thread locks through a descriptor of its own (two descriptors of one
process conflict only when they are separate open file descriptions), and a
forked process opens its own instead of sharing its parent's.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from typing import Any

from .base import Passed

# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD).
_FLOCK = struct.Struct("hhqqi4x")


class RangeLock:
    def __init__(self, fd: int | None = None) -> None:
        """A new lock, or the one whose memfd `fd` is (handed over)."""
        self._fd = os.memfd_create("nbdluks-rmw", os.MFD_CLOEXEC) if fd is None else fd
        self._local = threading.local()
        self._opened: list[tuple[int, int]] = []  # (pid, fd) of every thread's descriptor
        self._opened_lock = threading.Lock()

    def __reduce__(self) -> Any:
        return RangeLock, (Passed(self._fd),)

    def _thread_fd(self) -> int:
        pid = os.getpid()
        mine: tuple[int, int] | None = getattr(self._local, "fd", None)
        if mine is None or mine[0] != pid:  # new thread, or inherited over fork
            # Opening the memfd anew makes a new open file description.
            fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
            self._local.fd = mine = (pid, fd)
            with self._opened_lock:
                self._opened.append(mine)
        return mine[1]

    @contextlib.contextmanager
    def hold(self, start: int, length: int, *, shared: bool = False) -> Iterator[None]:
        """Hold [start, start + length) exclusively, or `shared` with other
        shared holders (blocking until it is free)."""
        fd = self._thread_fd()
        kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
        try:
            yield
        finally:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start,
                                                           length, 0))

    def close(self) -> None:
        """Close every descriptor this process opened for the lock."""
        pid = os.getpid()
        with self._opened_lock:
            for owner, fd in self._opened:
                if owner == pid:
                    os.close(fd)
            self._opened.clear()
        self._local = threading.local()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SharedCells:
    """A few unsigned 64-bit numbers that a process, the workers it forks
    afterwards and those it hands them to all see (a shared mapping of a memfd)."""

    def __init__(self, count: int, fd: int | None = None) -> None:
        """New cells, or the ones whose memfd `fd` is (handed over)."""
        self.count = count
        self._fd = os.memfd_create("nbdluks-cells", os.MFD_CLOEXEC) if fd is None else fd
        if fd is None:
            os.ftruncate(self._fd, 8 * count)
        self._map = mmap.mmap(self._fd, 8 * count, mmap.MAP_SHARED)

    def __reduce__(self) -> Any:
        return SharedCells, (self.count, Passed(self._fd))

    def get(self) -> tuple[int, ...]:
        return struct.unpack_from(f"{self.count}Q", self._map)

    def set(self, *values: int, at: int = 0) -> None:
        """Cells `at`.. set (an aligned 8-byte store each, in order)."""
        struct.pack_into(f"{len(values)}Q", self._map, 8 * at, *values)
