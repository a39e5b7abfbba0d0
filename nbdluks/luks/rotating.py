"""A volume whose key is being rotated while it is served: bytes below the
boundary are under the new key, the others under the old one, and the
boundary moves as the reencryption (another process) finishes its steps.

The boundary and the zone a step is rewriting live in memory shared with
that process, and every request holds its byte range of a lock shared
with it: a step holds its zone exclusively, so a request that touches the
zone (or the zone a step waits for) waits for the step and then goes where
the moved boundary says. A
zone whose step never finished (its process died) is refused with EIO
until the server is restarted and the step recovered.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..block import BlockDevice, Buffer, RangeLock, SharedCells
from .device import LuksDevice
from .hotzone import backup, done, supported
from .luks2 import make_segment
from .multikey import MultiKeyDevice
from .reencrypt import logical_size
from .volume import Volume

_SPINS = 1000  # reads of a generation being changed (two stores take nanoseconds) ...
_STALE = 2.0  # ... then, between naps, seconds until its publisher counts as dead


@dataclass
class Boundary:
    """Shared by the server's processes and the one that reencrypts: a
    generation (a seqlock: odd while the others change), the boundary, the
    zone a step is rewriting (or waits to rewrite: pending); and the zone lock."""

    cells: SharedCells = field(default_factory=lambda: SharedCells(5))
    zone: RangeLock = field(default_factory=RangeLock)

    def get(self) -> tuple[int, int, int, int, bool]:
        """(generation, boundary, zone start, zone end, pending), consistent.
        A generation that stays odd for _STALE seconds (the process died
        between two stores) is a step over everything: every request then
        answers EIO. One that a live process left odd while descheduled
        (a CPU starved by other work) is waited for, napping so that it
        runs: spinning alone gave up after ~40 ms, and reads answered EIO."""
        deadline = None
        while True:
            for _ in range(_SPINS):
                gen, done, start, end, pending = self.cells.get()
                if not gen % 2 and self.cells.get()[0] == gen:
                    return gen, done, start, end, bool(pending)
            now = time.monotonic()
            deadline = deadline or now + _STALE
            if now >= deadline:
                return gen, done, 0, 1 << 64, False
            time.sleep(0.001)

    def generation(self) -> int:
        return int(self.cells.get()[0])

    def moved(self) -> int:
        """The boundary as last stored (one cell: no wait; for the metrics)."""
        return int(self.cells.get()[1])

    def publish(self, done: int, start: int = 0, end: int = 0, pending: bool = False) -> None:
        gen = self.generation()
        self.cells.set(gen + 1)
        self.cells.set(done, start, end, int(pending), at=1)
        self.cells.set(gen + 2)

    @contextlib.contextmanager
    def step(self, done: int, start: int, end: int) -> Iterator[None]:
        """Hold [start, end) while it is rewritten; the boundary at `end`
        after. Pending until held: Linux grants shared OFD locks while an
        exclusive request waits (no writer preference), so requests that
        kept overlapping the zone would hold the step off for as long as
        they came; while it is pending, those that overlap it wait."""
        self.publish(done, start, end, pending=True)
        held = False
        try:
            with self.zone.hold(start, end - start):
                held = True
                self.publish(done, start, end)
                yield
                self.publish(end)
        finally:
            if not held:
                self.publish(done)  # nothing was rewritten

    def let_pass(self, offset: int, length: int) -> None:
        """Wait while a step waits for a zone that [offset, offset + length)
        overlaps, so that it gets the zone before this request (which then
        waits for it on the lock); for _STALE seconds at most (a step that
        died waiting rewrote nothing: going ahead is safe)."""
        deadline = None
        while True:
            _, _, start, end, pending = self.get()
            if not (pending and start < end and offset < end and start < offset + length):
                return
            now = time.monotonic()
            deadline = deadline or now + _STALE
            if now >= deadline:
                return
            time.sleep(0.0005)


class RotatingDevice(MultiKeyDevice):
    reads_may_wait = True  # a read in the zone being rewritten waits for the step

    def __init__(self, payload: BlockDevice, vol: Volume, keys: dict[str, bytearray],
                 boundary: Boundary | None = None, *, read_only: bool = False,
                 allow_discards: bool = False, attached: bool = False,
                 rmw_lock: RangeLock | None = None) -> None:
        """`boundary`: a reopened device's, shared; None: a new one, at the
        header's progress."""
        state = vol.reencryption
        assert state is not None
        supported(state)
        self._keep(payload, vol, keys, read_only=read_only, allow_discards=allow_discards,
                   attached=attached, rmw_lock=rmw_lock)
        assert self._keys is not None
        prev, final = backup(state.md, "backup-previous"), backup(state.md, "backup-final")
        align = max(prev["sector_size"], final["sector_size"])
        total = logical_size(state, payload.size)
        self.size = total - total % align
        opts: dict[str, Any] = dict(read_only=read_only, allow_discards=allow_discards,
                                    attached=attached, rmw_lock=self._rmw, size=self.size)
        assert state.old_digest is not None and state.new_digest is not None
        self.old = LuksDevice(payload, vol, self._keys[state.old_digest],
                              segment=make_segment(prev), **opts)
        self.new = LuksDevice(payload, vol, self._keys[state.new_digest],
                              segment=make_segment(final), **opts)
        if boundary is None:
            boundary = Boundary()
            boundary.publish(done(state, self.size))
        self.boundary = boundary
        self.caps = self.new.caps
        self.min_block = max(self.old.min_block, self.new.min_block)
        self.pref_block = max(self.old.pref_block, self.new.pref_block)
        self.inline_max = min(self.old.inline_max, self.new.inline_max)

    @contextlib.contextmanager
    def _routed(self, offset: int, length: int
                ) -> Iterator[list[tuple[LuksDevice, int, int, int]]]:
        """(device, its offset, offset in the request, length) per side of
        the boundary, with the range held against a step."""
        self.boundary.let_pass(offset, length)
        with self.boundary.zone.hold(offset, max(length, 1), shared=True):
            _, moved, start, end, pending = self.boundary.get()
            if start < end and not pending and offset < end and start < offset + length:
                raise OSError(errno.EIO, "this zone's reencryption step did not finish: "
                              "restart the server to recover it")
            yield self._parts(offset, length, moved)

    def _parts(self, offset: int, length: int, moved: int
               ) -> list[tuple[LuksDevice, int, int, int]]:
        parts = []
        if offset < moved:
            parts.append((self.new, offset, 0, min(length, moved - offset)))
        if offset + length > moved:
            at = max(offset, moved)
            parts.append((self.old, at, at - offset, offset + length - at))
        return parts

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        # Without the lock first: a read that a step may have overlapped
        # (the generation moved) is read again under it.
        gen, moved, start, end, _ = self.boundary.get()
        if not (start < end and offset < end and start < offset + len(buf)):
            for dev, at, b, n in self._parts(offset, len(buf), moved):
                dev.pread_into(buf[b : b + n], at)
            if self.boundary.generation() == gen:
                return
        with self._routed(offset, len(buf)) as parts:
            for dev, at, b, n in parts:
                dev.pread_into(buf[b : b + n], at)

    def _pwrite(self, buf: Buffer, offset: int, fua: bool, owned: bool) -> None:
        view = memoryview(buf)
        with self._routed(offset, len(view)) as parts:
            for dev, at, b, n in parts:
                dev.pwrite(view[b : b + n], at, fua)

    def _write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                      fast: bool) -> None:
        with self._routed(offset, length) as parts:
            for dev, at, _, n in parts:
                dev.write_zeroes(at, n, fua=fua)

    def _trim(self, offset: int, length: int, fua: bool) -> None:
        with self._routed(offset, length) as parts:
            for dev, at, _, n in parts:
                if dev.caps.trim:
                    dev.trim(at, n, fua=fua)

    def _cache(self, offset: int, length: int) -> None:
        self.new.cache(offset, length)

    def may_wait(self, offset: int, length: int, write: bool) -> bool:
        """A request in the zone a step rewrites waits for the step (one
        that starts just after this look waits too: seldom, and no longer
        than a step); a partial-sector write for its read-modify-write. One
        look, no wait (a boundary being moved: yes), as it is asked on the loop."""
        gen, _, start, end, _ = self.boundary.cells.get()
        return bool(gen % 2) or (start < end and offset < end and start < offset + length) or (
            write and (self.new.may_wait(offset, length, write)
                       or self.old.may_wait(offset, length, write)))

    def luks_devices(self) -> list[LuksDevice]:
        return [self.old, self.new]

    def _shared(self) -> tuple[Any, ...]:
        return (self.boundary,)

    def ciphers(self) -> tuple[Any, Any]:
        """The old and the new key's sector ciphers (for the reencryption)."""
        return self.old.cipher, self.new.cipher

    def describe(self) -> dict[str, Any]:
        return {**self.new.describe(), "reencrypting": True}
