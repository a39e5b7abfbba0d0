"""A local regular file or block device."""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import time
from typing import Any

from .base import (
    BlockDevice,
    Buffer,
    Capabilities,
    DirectRead,
    Extent,
    Passed,
    sector_size_for,
    zero_fill,
)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

# Reads the server may answer on its event loop when they come from the page
# cache (DirectRead): a copy of this size costs less than a thread's hop.
DIRECT_CACHED_MAX = 1024 * 1024
# READs at least this long are sent with holes skipped (OFFSET_HOLE).
SPARSE_READ_MIN = 64 * 1024
# A hole probe slower than this stops probing for _PROBE_BACKOFF seconds.
_PROBE_SLOW = 0.0005
_PROBE_BACKOFF = 10.0

# errnos meaning "this file system or device cannot do that", not a failure
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


_BLKSSZGET = 0x1268  # logical block size (int)
_BLKPBSZGET = 0x127B  # physical block size (unsigned int)


def _ioctl_int(fd: int, request: int) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, request, buf)
    except OSError:
        return 512
    return buf[0]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    # ctypes releases the GIL around foreign calls.
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileDevice(BlockDevice):
    def __init__(self, path: str, *, read_only: bool = False, fd: int | None = None) -> None:
        """Open `path`, or take over `fd` (already open on it)."""
        self.path = path
        self.read_only = read_only
        self.fd = fd if fd is not None else os.open(
            path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not (self.is_block or stat.S_ISREG(st.st_mode)):
                raise OSError(errno.EINVAL, "not a regular file or block device")
            self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block else st.st_size
        except BaseException:
            os.close(self.fd)
            raise
        self.inline_max = 64 * 1024
        # Learned on first use: a file system without punch-hole / zero-range.
        self._can_punch = True
        self._can_zero_range = True
        self._probe_off_until = 0.0
        writable = not read_only
        self.caps = Capabilities(
            writable=writable,
            flush=True,
            fua=writable,
            trim=writable,
            zero=writable,
            fast_zero=writable,
            extents=not self.is_block,
            cache=True,
            multi_conn=True,
        )

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        done = 0
        total = len(buf)
        while done < total:
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                raise OSError(errno.EIO, "unexpected end of file (was it truncated?)")
            done += n

    def direct_read(self) -> DirectRead:
        return DirectRead(self.fd, 0, self.size, 1, self.inline_max, DIRECT_CACHED_MAX, self,
                          sparse_min=SPARSE_READ_MIN if self.caps.extents else 0)

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        view = memoryview(buf)
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)
        if fua:
            os.fdatasync(self.fd)

    def _flush(self) -> None:
        os.fdatasync(self.fd)

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        # Advisory: where the file system cannot punch holes, do nothing.
        if self._can_punch:
            try:
                fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
                self._can_punch = False
        if fua:
            os.fdatasync(self.fd)

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        modes = []
        if may_trim and self._can_punch:
            modes.append(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
        if self._can_zero_range:
            modes.append(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
            except OSError as e:
                if e.errno not in _NOT_SUPPORTED:
                    raise
                if mode & _FALLOC_FL_PUNCH_HOLE:
                    self._can_punch = False
                else:
                    self._can_zero_range = False
                continue
            if fua:
                os.fdatasync(self.fd)
            return
        if fast:
            raise OSError(errno.EOPNOTSUPP, "zeroing would not be fast here")
        zero_fill(self, offset, length, fua)

    def _cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def _read_extents(self, offset: int, length: int) -> list[Extent] | None:
        # SEEK_HOLE scans the page cache of unwritten (preallocated) extents
        # page by page, which is slow over a large cached one. Small reads gain
        # nothing from holes, and slow probes stop probing for a while.
        if length < SPARSE_READ_MIN or time.monotonic() < self._probe_off_until:
            return None
        t = time.perf_counter()
        ext = self._extents(offset, length)
        if time.perf_counter() - t > _PROBE_SLOW:
            self._probe_off_until = time.monotonic() + _PROBE_BACKOFF
        return ext

    def _extents(self, offset: int, length: int) -> list[Extent]:
        out: list[Extent] = []
        end = offset + length
        pos = offset
        try:
            while pos < end:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
                if data > pos:
                    n = min(data, end) - pos
                    out.append(Extent(n, hole=True, zero=True))
                    pos += n
                    continue
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                n = min(hole, end) - pos
                out.append(Extent(n))
                pos += n
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos: a hole up to EOF
                out.append(Extent(end - pos, hole=True, zero=True))
            elif e.errno in _NOT_SUPPORTED:
                out.append(Extent(end - pos))
            else:
                raise
        return out

    def sector_hint(self) -> int:
        st = os.fstat(self.fd)
        if not self.is_block:
            return sector_size_for(st.st_blksize)  # as cryptsetup, the file system's block
        logical = _ioctl_int(self.fd, _BLKSSZGET)
        physical = _ioctl_int(self.fd, _BLKPBSZGET)
        if logical >= 4096 or logical >= physical or physical <= 512 or physical > 4096 \
                or physical % max(logical, 1):
            return sector_size_for(logical)
        return sector_size_for(physical)

    def __reduce__(self) -> Any:
        return _passed_file, (self.path, self.read_only, Passed(self.fd))

    def reopen(self) -> FileDevice:
        """Another device on the same open file (a duplicated descriptor): a
        worker process may no longer have the right to open the path."""
        return FileDevice(self.path, read_only=self.read_only, fd=os.dup(self.fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _passed_file(path: str, read_only: bool, fd: int) -> FileDevice:
    return FileDevice(path, read_only=read_only, fd=fd)
