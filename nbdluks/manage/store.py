"""The header device of a volume being changed: opened for writing, locked
as cryptsetup locks it, read, checked against a concurrent change, and
written step by step (a Sync is fsync on a file, FLUSH on an NBD export).

cryptsetup takes flock(LOCK_EX) on a regular file itself, and on a block
device a lock file /run/cryptsetup/L_MAJOR:MINOR; we take the same locks,
so nbdluks and cryptsetup never write one header at once. An NBD export
has no lock: the LUKS2 seqid (LUKS1: the whole binary header) is read
again just before the first write, and a change seen there is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass

import structlog

from .. import signals
from ..block import BlockDevice
from ..errors import NbdluksError
from ..luks import HeaderError, Step, Sync, Volume, Write
from ..nbd import UpstreamOptions, is_nbd_uri
from ..unlock import HeaderCopy, open_source, read_header

log = structlog.get_logger("nbdluks.manage")
LOCK_DIR = "/run/cryptsetup"
PHDR_SIZE = 592  # LUKS1's binary header


class ManageError(NbdluksError):
    """A change that cannot be made; nothing was written."""


class ConcurrentChangeError(ManageError):
    """The header changed on its device since it was read."""


def _lock(dev: BlockDevice, source: str) -> int | None:
    """cryptsetup's write lock for a local source; the fd that holds it."""
    fd = getattr(dev, "fd", None)
    if fd is None:
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        lock_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    elif stat.S_ISBLK(st.st_mode) and os.path.isdir(LOCK_DIR):
        name = f"{LOCK_DIR}/L_{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        try:
            lock_fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None  # not ours to create (not root): cryptsetup could not either
    else:
        return None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(lock_fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ManageError(f"{source} is locked by another process changing its header "
                              "(cryptsetup or nbdluks): try again when it is done") from None
        raise
    return lock_fd


@dataclass
class HeaderStore:
    source: str
    dev: BlockDevice
    lock_fd: int | None = None
    created: bool = False  # the file did not exist before
    vol: Volume | None = None
    raw: bytes = b""

    @classmethod
    def open(cls, source: str, upstream: UpstreamOptions, *, create: bool = False
             ) -> HeaderStore:
        """Open `source` for writing and lock it. `create`: a local file that
        does not exist yet is created (empty, mode 0600)."""
        created = create and not is_nbd_uri(source) and not os.path.exists(source)
        if created:
            try:
                os.close(os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600))
            except OSError as e:
                raise ManageError(f"cannot create the header file {source}: {e.strerror}"
                                  ) from None
        try:
            dev = open_source(source, read_only=False, upstream=upstream)
        except BaseException:
            if created:
                os.unlink(source)
            raise
        if not dev.caps.writable:
            dev.close()
            raise ManageError(f"{source} is read-only: the header cannot be changed")
        store = cls(source, dev, created=created)
        try:
            store.lock_fd = _lock(dev, source)
        except BaseException:
            dev.close()
            raise
        return store

    def read(self, argon2_max_kib: int) -> Volume:
        self.vol, self.raw = read_header(self.dev, argon2_max_kib)
        return self.vol

    def copy(self) -> HeaderCopy:
        """The header as `unlock` takes it (the device stays ours)."""
        return HeaderCopy(self.source, self.vol, self.raw, self.dev)

    def grows(self) -> bool:
        """Whether the device is a regular file (it can be extended)."""
        fd = getattr(self.dev, "fd", None)
        return fd is not None and stat.S_ISREG(os.fstat(fd).st_mode)

    def grow(self, size: int) -> None:
        """A header file shorter than the new header is extended (cryptsetup
        extends it too); a device that cannot grow is refused."""
        if self.dev.size >= size:
            return
        if not self.grows():
            raise ManageError(f"{self.source} holds {self.dev.size} bytes; the header "
                              f"needs {size}")
        os.ftruncate(self.dev.fd, size)  # type: ignore[attr-defined]
        self.dev.size = size

    def check_unchanged(self) -> None:
        """Refuse to write over a header someone else changed since it was read."""
        assert self.vol is not None
        n = PHDR_SIZE if self.vol.version == 1 else 24
        buf = bytearray(n)
        self.dev.pread_into(memoryview(buf), 0)
        if bytes(buf) != self.raw[:n]:
            raise ConcurrentChangeError(
                f"the header on {self.source} changed while this command ran (another "
                "nbdluks or cryptsetup?): nothing was written; run it again")

    def header_end(self) -> int:
        """Where the binary headers end: a write below it is the header's."""
        assert self.vol is not None
        if self.vol.version == 1:
            return PHDR_SIZE
        return 2 * (int(self.vol.json["config"]["json_size"]) + 4096)

    def apply(self, steps: list[Step], *, check: bool = True) -> None:
        """Perform the steps. With `check`, the header is compared with what
        was read before anything is written and again just before the header
        itself is: on an NBD store (no lock) that shrinks the window in which
        a concurrent change can be lost to the time key material takes to
        write. Stop signals wait until the steps are done."""
        check = check and self.vol is not None
        end = self.header_end() if check else 0
        with signals.held_back():
            if check:
                self.check_unchanged()
            for step in steps:
                if isinstance(step, Sync):
                    self._sync()
                    continue
                if check and step.offset < end:
                    self.check_unchanged()
                    check = False
                self.dev.pwrite(memoryview(step.data), step.offset)

    def verify(self, steps: list[Step]) -> None:
        """Read back what the steps left: on a store without a lock, a change
        made by someone else at the same moment shows as bytes that are not
        ours, and this change is reported as not made rather than as done."""
        final: dict[int, bytes | bytearray] = {}
        for step in steps:
            if isinstance(step, Write):
                final[step.offset] = step.data  # the last write to a place counts
        for offset, data in final.items():
            got = bytearray(len(data))
            self.dev.pread_into(memoryview(got), offset)
            if got != data:
                raise ConcurrentChangeError(
                    f"another change to the header on {self.source} interfered with this "
                    "one, which may not have been made: look with inspect, run it again")

    def _sync(self) -> None:
        if self.dev.caps.flush:
            self.dev.flush()

    def close(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        self.dev.close()

    def __enter__(self) -> HeaderStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def reread(store: HeaderStore, argon2_max_kib: int) -> Volume:
    """The header as written, parsed again: what a change left must be valid."""
    try:
        return store.read(argon2_max_kib)
    except HeaderError as e:
        raise ManageError(f"the header written to {store.source} does not read back: {e}"
                          ) from None
