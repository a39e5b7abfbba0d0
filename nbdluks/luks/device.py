"""LuksDevice: the plaintext view of a LUKS payload, as a BlockDevice filter.

Reads decrypt and writes encrypt whole sectors in bulk; requests that do not
cover whole sectors are read-modify-written under a lock, so that clients
which ignore the advertised block size (the kernel's nbd-client) still work.
Only the operations this layer understands pass through it: an unknown one
can never reach the payload as plaintext.
"""

from __future__ import annotations

import errno
import math
import pickle
from collections.abc import Callable
from typing import Any

from ..block import BlockDevice, Buffer, Capabilities, DirectRead, RangeLock
from .cipher import SectorCipher
from .errors import HeaderError
from .unlock import lock_in_memory, wipe
from .volume import SECTOR, Segment, Volume

# Largest run of sectors encrypted at once when writing zeroes.
_ZERO_CHUNK = 4 * 1024 * 1024
# Longest read the fast path decrypts (nbd/fastpath.py LIMIT: one call's worth).
DIRECT_DECRYPT_MAX = 256 * 1024


class LuksDevice(BlockDevice):
    def __init__(
        self, payload: BlockDevice, vol: Volume, key: bytes | bytearray, *,
        read_only: bool = False, allow_discards: bool = False, attached: bool = False,
        rmw_lock: RangeLock | None = None, segment: Segment | None = None,
        size: int | None = None,
    ) -> None:
        """A view of `payload` through `key` (copied: the device keeps its own
        copy, mlocked where allowed, until seal() or close()). `rmw_lock`:
        shared with the devices of other processes; else one of its own.
        `segment` and `size`: one segment of a volume in reencryption."""
        vol.check_servable()
        seg = segment or vol.segment
        self.payload = payload
        self.vol = vol
        self.read_only = read_only
        self.allow_discards = allow_discards
        self.attached = attached
        self.sector_size = ss = seg.sector_size
        self.data_offset = seg.offset
        if attached and seg.offset < vol.metadata_size:
            raise HeaderError(
                f"the data segment (offset {seg.offset}) overlaps the header "
                f"({vol.metadata_size} bytes)"
            )
        self.size = size if size is not None else _data_size(vol, payload.size)
        self._segment = segment
        self.iv_tweak = seg.iv_tweak
        self.cipher = SectorCipher(seg.cipher_spec(), key, ss, iv_step=ss // SECTOR)
        self._key: bytearray | None = bytearray(key)
        self.key_locked = lock_in_memory(self._key)
        self.min_block = ss
        # Crypto is CPU work on the loop thread: inline only small requests.
        self.inline_max = min(payload.inline_max, 16 * 1024)
        self.pref_block = max(4096, ss)
        self._own_lock = rmw_lock is None
        self._rmw = rmw_lock if rmw_lock is not None else RangeLock()
        pc = payload.caps
        writable = pc.writable and not read_only
        self.caps = Capabilities(
            writable=writable,
            flush=pc.flush,
            fua=writable and (pc.fua or pc.flush),
            trim=writable and allow_discards and pc.trim,
            zero=writable,  # as encrypted zeroes: never a plaintext hole
            fast_zero=False,
            extents=False,
            cache=pc.cache,
            multi_conn=pc.multi_conn,
        )
        self.multi_open = payload.multi_open
        self.has_upstream = payload.has_upstream

    # --- life: the payload's, and the key kept for reopening ----------------

    def before_fork(self) -> None:
        self.payload.before_fork()

    def reopen(self) -> LuksDevice:
        if self._key is None:
            raise OSError(errno.EOPNOTSUPP, "sealed: the key is forgotten")
        payload = self.payload.reopen()
        try:
            # Partial-sector writes of every process take turns on one lock
            # (its memfd is inherited over fork).
            return LuksDevice(payload, self.vol, self._key, read_only=self.read_only,
                              allow_discards=self.allow_discards, attached=self.attached,
                              rmw_lock=self._rmw, segment=self._segment,
                              size=self.size if self._segment else None)
        except BaseException:
            payload.close()
            raise

    def __reduce__(self) -> Any:
        """The arguments that rebuild it in a running worker (see block.Passed)."""
        if self._key is None:
            raise TypeError("sealed: the key is forgotten")
        return _passed, (self.payload, self.vol, pickle.PickleBuffer(self._key),
                         {"read_only": self.read_only, "allow_discards": self.allow_discards,
                          "attached": self.attached, "rmw_lock": self._rmw,
                          "segment": self._segment,
                          "size": self.size if self._segment else None})

    def forget_key(self) -> None:
        if self._key is not None:
            wipe(self._key)
            self._key = None

    def seal(self) -> None:
        self.forget_key()
        self.payload.seal()

    def watch(self, report: Callable[[bool], object]) -> None:
        self.payload.watch(report)

    def describe(self) -> dict[str, Any]:
        return {"cipher_engine": self.cipher.engine, "key_locked_in_memory": self.key_locked,
                **self.payload.describe()}

    def _iv(self, sector_index: int) -> int:
        return self.iv_tweak + sector_index * (self.sector_size // SECTOR)

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        ss = self.sector_size
        start = offset - offset % ss
        end = -(-(offset + length) // ss) * ss
        return start, end

    def _read_sectors(self, buf: memoryview, start: int) -> None:
        self.payload.pread_into(buf, self.data_offset + start)
        self.cipher.decrypt(buf, self._iv(start // self.sector_size))

    def _write_sectors(self, buf: bytearray, start: int, fua: bool) -> None:
        """Encrypt `buf` in place and write it at plaintext offset `start`."""
        self.cipher.encrypt(buf, self._iv(start // self.sector_size))
        self.payload.pwrite(buf, self.data_offset + start, fua=fua)

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        start, end = self._span(offset, len(buf))
        if start == offset and end == offset + len(buf):
            self._read_sectors(buf, start)
            return
        tmp = memoryview(bytearray(end - start))
        self._read_sectors(tmp, start)
        buf[:] = tmp[offset - start : offset - start + len(buf)]

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        start, end = self._span(offset, len(buf))
        if start == offset and end == offset + len(buf):
            mine = buf if owned and isinstance(buf, bytearray) else bytearray(buf)
            self._write_sectors(mine, start, fua)
            return
        # Read-modify-write of the partial sectors at the edges; serialized so
        # two writes into different bytes of one sector both survive.
        with self._rmw.hold(start, end - start):
            tmp = bytearray(end - start)
            ss = self.sector_size
            view = memoryview(tmp)
            if start != offset:
                self._read_sectors(view[:ss], start)
            if end != offset + len(buf) and (end - ss > start or start == offset):
                self._read_sectors(view[-ss:], end - ss)
            tmp[offset - start : offset - start + len(buf)] = buf
            self._write_sectors(tmp, start, fua)

    def _flush(self) -> None:
        self.payload.flush()

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        # Encrypted zeroes, never a hole: a payload hole would decrypt to noise.
        end = offset + length
        pos = offset
        while pos < end:
            n = min(_ZERO_CHUNK, end - pos)
            self.pwrite(bytearray(n), pos, owned=True)
            pos += n
        if fua:
            self.flush()

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        # Only whole sectors are discarded; a discard is advisory.
        ss = self.sector_size
        start = -(-offset // ss) * ss
        end = (offset + length) // ss * ss
        if end > start:
            self.payload.trim(self.data_offset + start, end - start, fua=fua)
        elif fua:
            self.flush()

    def _cache(self, offset: int, length: int) -> None:
        start, end = self._span(offset, length)
        self.payload.cache(self.data_offset + start, end - start)

    def direct_read(self) -> DirectRead | None:
        below = self.payload.direct_read()
        decrypt = self.cipher.direct(self.iv_tweak)
        if below is None or below.decrypt is not None or decrypt is None:
            return None
        # Decryption is CPU work on the event loop (the GIL released): reads
        # from the page cache up to a run's worth (nbdcopy's 256 KiB: LUKS2
        # 4 KiB-sector reads 1.6 -> 2.5 GB/s, and a QD1 reader beside it
        # waited less than beside the thread pool's GIL handovers); where
        # the kernel cannot tell, only short ones.
        short = min(below.max_length, self.inline_max)
        return DirectRead(below.fd, below.base + self.data_offset, self.size,
                          math.lcm(below.align, self.sector_size), short,
                          min(below.max_cached, DIRECT_DECRYPT_MAX), self, decrypt=decrypt)

    def may_wait(self, offset: int, length: int, write: bool) -> bool:
        if not write:
            return False
        start, end = self._span(offset, length)
        return start != offset or end != offset + length

    def close(self) -> None:
        self.seal()
        if self._own_lock:
            self._rmw.close()
        self.payload.close()


def _passed(payload: BlockDevice, vol: Volume, key: bytearray,
            options: dict[str, Any]) -> LuksDevice:
    dev = LuksDevice(payload, vol, key, **options)
    dev._own_lock = True  # the lock handed over is this process's own object
    return dev


def _data_size(vol: Volume, payload_size: int) -> int:
    """The plaintext size: the segment's, which the payload must hold, or
    (dynamic) what the payload holds past the offset, in whole sectors."""
    seg = vol.segment
    avail = payload_size - seg.offset
    if seg.size is None:
        size = avail - avail % seg.sector_size
    else:
        size = seg.size
        if size > avail:
            raise HeaderError(
                f"the data segment needs {seg.offset + size} bytes, the payload has "
                f"{payload_size}"
            )
    if size <= 0:
        raise HeaderError(f"the payload ({payload_size} bytes) holds no data sectors")
    return size
