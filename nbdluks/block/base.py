"""The BlockDevice contract: what every source and filter offers the server.

The public methods check the request once, here, as nbdkit's backend.c
does for its plugins and filters: the range, writability, the capability,
and FUA (passed on when the device does it itself, else emulated with a
flush). Only then do they call the device's `_pread_into`, `_pwrite`, ...,
which may assume a valid request. Capabilities are off unless a layer turns
them on, so an operation a layer does not understand can never pass through
it (a crypto layer must never let an unknown write reach the payload as
plaintext).

Methods are synchronous and run on worker threads (one hop per request);
failures are `OSError`s whose errno the server maps to an NBD error.

The contract also holds the device's life, as nbdkit's thread model,
after_fork and can_multi_conn do: whether other processes may open it too
(`multi_open`), how a worker process gets its own (`before_fork` in the
parent, `reopen` in the worker; or, for a worker already running, pickled
with its descriptors beside it: `Passed`), when what only reopening needs (a
key) is forgotten (`seal`), which upstream connection it depends on
(`watch`), and closing. Nothing outside a device's own module asks for its
class.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Capabilities:
    writable: bool = False
    flush: bool = False
    fua: bool = False  # the device does FUA itself; else a flush emulates it
    trim: bool = False
    zero: bool = False
    fast_zero: bool = False
    extents: bool = False  # holes are reported; else everything is data
    cache: bool = False
    # Every connection sees the others' completed writes and a FLUSH on one
    # covers all: true for one process serving one backing store.
    multi_conn: bool = False


@dataclass(frozen=True, slots=True)
class Extent:
    length: int
    hole: bool = False
    zero: bool = False


@dataclass(frozen=True, slots=True)
class Passed:
    """A file descriptor in a pickled device: it travels beside the pickle
    (SCM_RIGHTS) and is a plain descriptor number again once unpickled. A
    device that can be handed to a running worker pickles as the arguments
    that rebuild it (keys as `pickle.PickleBuffer`s, which travel out of
    band and are wiped once the device has its own copy)."""

    fd: int


@dataclass(frozen=True, slots=True)
class Decrypt:
    """AES-XTS in place through libcrypto's EVP, for C code: the addresses
    of EVP_CipherInit_ex and EVP_CipherUpdate, a decrypting context for the
    calling thread, the IV generator (evp.C_IVGENS), the IV of the device's
    first unit, the IV step per unit and the unit (sector) size."""

    init: int
    update: int
    ctx: int
    iv_mode: int
    iv_first: int
    iv_step: int
    unit: int


@dataclass(frozen=True, slots=True)
class DirectRead:
    """How the server may answer this device's reads without calling it
    (nbd/fastpath.py): pread `fd` at `base` + offset, then `decrypt`. For
    reads of whole `align` multiples of up to `max_cached` bytes when the
    kernel can tell that they are served from its page cache, else of up to
    `max_length`; structured reads without DF of `sparse_min` bytes or more
    (0: none) go through the device, which may skip holes, unless `fd` has
    none in their range (SEEK_HOLE). `keep` owns the
    descriptor and the context; both stay valid until it is closed, on the
    thread that asked."""

    fd: int
    base: int
    size: int
    align: int
    max_length: int
    max_cached: int
    keep: object
    sparse_min: int = 0
    decrypt: Decrypt | None = None


def unsupported(what: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"{what} is not supported by this device")


class BlockDevice:
    """Base class: a fixed-size byte range with optional operations."""

    size: int = 0
    min_block: int = 1
    pref_block: int = 4096
    max_block: int = 0  # 0: no limit of its own (the protocol layer caps requests)
    caps: Capabilities = Capabilities()
    # Requests up to this many bytes are quick enough (page cache, CPU only)
    # to run on the event loop instead of a worker thread; 0: never.
    inline_max: int = 0
    reads_may_wait = False  # may_wait is asked for reads too (else: writes only)
    # Devices from reopen() (one per worker process) see each other's
    # writes, and a flush through one covers them all; else one process
    # serves it.
    multi_open: bool = True
    # It depends on the connection to an NBD upstream (see watch()).
    has_upstream: bool = False

    # --- the contract, checked once -------------------------------------

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._check_range(offset, len(buf))
        self._pread_into(buf, offset)

    def pwrite(self, buf: Buffer, offset: int, fua: bool = False, *, owned: bool = False) -> None:
        """Write `buf` at `offset`. With `owned` the caller gives `buf` up and
        a layer may use it as scratch space (encrypt it in place)."""
        self._check_write(offset, len(buf))
        native = self._fua(fua)
        self._pwrite(buf, offset, native, owned)
        if fua and not native:
            self._flush()

    def flush(self) -> None:
        if not self.caps.flush:
            raise unsupported("flush")
        self._flush()

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False,
                     may_trim: bool = False, fast: bool = False) -> None:
        self._check_write(offset, length)
        if not self.caps.zero:
            raise unsupported("write zeroes")
        if fast and not self.caps.fast_zero:
            raise OSError(errno.EOPNOTSUPP, "zeroing would not be fast here")
        native = self._fua(fua)
        self._write_zeroes(offset, length, native, may_trim, fast)
        if fua and not native:
            self._flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_write(offset, length)
        if not self.caps.trim:
            raise unsupported("trim")
        native = self._fua(fua)
        self._trim(offset, length, native)
        if fua and not native:
            self._flush()

    def cache(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if not self.caps.cache:
            raise unsupported("cache")
        self._cache(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least [offset, offset+length)."""
        self._check_range(offset, length)
        if not self.caps.extents:
            return [Extent(length)]
        return self._extents(offset, length)

    def read_extents(self, offset: int, length: int) -> list[Extent] | None:
        """Extents for a READ that may skip holes, or None when finding them
        would cost more than sending zeroes."""
        if not self.caps.extents:
            return None
        self._check_range(offset, length)
        return self._read_extents(offset, length)

    def direct_read(self) -> DirectRead | None:
        """How small reads may skip this device's methods (for the calling
        thread), or None: every read goes through pread_into."""
        return None

    def may_wait(self, offset: int, length: int, write: bool) -> bool:
        """Whether a read or write of this range may wait on a lock (a
        partial-sector read-modify-write, a zone being reencrypted): such a
        request never runs on the event loop."""
        return False

    # --- the device's life --------------------------------------------

    def before_fork(self) -> None:
        """In the parent, before worker processes are forked: let go of what
        must not cross a fork (threads, connections). Afterwards the parent
        only calls reopen(), seal() and close()."""

    def reopen(self) -> BlockDevice:
        """An independent device on the same source, for a worker process
        (called in the worker, after the fork)."""
        raise OSError(errno.EOPNOTSUPP, "this device cannot be opened again")

    def __reduce__(self) -> Any:
        """A device pickles only as its class says how (see `Passed`)."""
        raise TypeError(f"{type(self).__name__} cannot be handed to another process")

    def seal(self) -> None:
        """No reopen() will be asked of this device: forget what only
        reopening needs (secrets)."""

    def watch(self, report: Callable[[bool], object]) -> None:
        """Call `report(up)` now and whenever the upstream connection goes or
        comes back; nothing when there is none (has_upstream false)."""

    def describe(self) -> dict[str, Any]:
        """What the device tells about itself in the log."""
        return {}

    def sector_hint(self) -> int:
        """The encryption sector size that suits the device (cryptsetup's
        device_optimal_encryptionsector_size_for): 512..4096."""
        return sector_size_for(self.min_block)

    def close(self) -> None:
        pass

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, "range outside the device")

    def _check_write(self, offset: int, length: int) -> None:
        if not self.caps.writable:
            raise OSError(errno.EPERM, "the device is read-only")
        self._check_range(offset, length)

    def _fua(self, fua: bool) -> bool:
        """Whether FUA goes to the device itself (else: a flush afterwards)."""
        if not fua or self.caps.fua:
            return fua
        if not self.caps.flush:
            raise unsupported("FUA")
        return False

    # --- what a device implements: requests arrive checked ----------------

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        raise unsupported("read")

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        raise unsupported("write")

    def _flush(self) -> None:
        raise unsupported("flush")

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        raise unsupported("write zeroes")

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        raise unsupported("trim")

    def _cache(self, offset: int, length: int) -> None:
        raise unsupported("cache")

    def _extents(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length)]

    def _read_extents(self, offset: int, length: int) -> list[Extent] | None:
        return None


def sector_size_for(block: int) -> int:
    if block >= 4096:
        return 512 if block % 4096 else 4096
    return block if block in (512, 1024, 2048) else 512


def zero_fill(dev: BlockDevice, offset: int, length: int, fua: bool, chunk: int = 1 << 20) -> None:
    """Write zeroes with ordinary writes: the slow path, never 'fast'."""
    zeros = bytes(min(chunk, length))
    end = offset + length
    while offset < end:
        n = min(len(zeros), end - offset)
        dev.pwrite(memoryview(zeros)[:n], offset)
        offset += n
    if fua:
        dev.flush()
