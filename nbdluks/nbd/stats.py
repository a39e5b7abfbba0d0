"""Counters of a server, in shared memory: one process reports exact totals
for all the worker processes it forked.

The memory is an anonymous shared mapping made before the fork, one slot of
8-byte cells per process. A process writes only its own slot (from its event
loop; an upstream's reconnect thread writes only the upstream cells), readers
add the slots up. Aligned 8-byte cells are loaded and stored whole on the
platforms we run on, so a reader sees a cell's old or its new value.

Request counts go to a plain list first and reach the shared cells on
`flush()` (the server flushes every half second, when a connection closes
and when it stops): a list update costs half a shared-memory one, and this
runs for every request. Gauges (open connections, upstream state) are
written through at once.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left
from dataclasses import dataclass, field

from .constants import Cmd, Errno

# Request latency histogram bounds, seconds (Prometheus `le`).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BOUNDS_NS = tuple(round(b * 1e9) for b in BUCKETS)
# Commands by their code; one more row for codes no command has.
COMMANDS = [c.name for c in Cmd] + ["unknown"]
ERRNOS = [e for e in Errno if e is not Errno.OK]
_ERR_INDEX = {int(e): i for i, e in enumerate(ERRNOS)}
_NCMD, _NERR, _NBUCKET = len(COMMANDS), len(ERRNOS), len(BUCKETS) + 1
_READ = int(Cmd.READ)

# Upstream states
UPSTREAM_NONE, UPSTREAM_UP, UPSTREAM_DOWN = 0, 1, 2

# Cell offsets within a slot
REQUESTS = 0
ERRORS = REQUESTS + _NCMD
LATENCY = ERRORS + _NCMD * _NERR  # _NBUCKET counts per command, not cumulative
LATENCY_SUM_NS = LATENCY + _NCMD * _NBUCKET
BYTES_READ = LATENCY_SUM_NS + _NCMD
BYTES_WRITTEN = BYTES_READ + 1
CONNECTIONS = BYTES_WRITTEN + 1  # open now (a gauge)
CONNECTIONS_TOTAL = CONNECTIONS + 1
REFUSED = CONNECTIONS_TOTAL + 1
EVICTED = REFUSED + 1
UPSTREAM = EVICTED + 1  # the payload's upstream state (a gauge)
RECONNECTS = UPSTREAM + 1
POLLED_NS = RECONNECTS + 1  # busy polling (nbd/poll.py): time spent, polls that found bytes, not
POLL_HITS = POLLED_NS + 1
POLL_MISSES = POLL_HITS + 1
_CELLS = POLL_MISSES + 1
_GAUGES = (CONNECTIONS, UPSTREAM)
# Per export, after a slot's cells: requests, errors, bytes read, bytes written.
EXPORT_REQUESTS, EXPORT_ERRORS, EXPORT_READ, EXPORT_WRITTEN = range(4)
_PER_EXPORT = 4


class Stats:
    """The counters of one process: its slot of a StatsTable."""

    __slots__ = ("_acc", "_c", "_rows")

    def __init__(self, cells: memoryview, rows: dict[str, int] | None = None) -> None:
        self._c = cells
        self._acc = [0] * len(cells)  # counted, not yet flushed
        self._rows = rows if rows is not None else {}

    def row(self, export: str) -> int:
        """The first cell of an export's counters; -1: it has none."""
        row = self._rows.get(export)
        return -1 if row is None else _CELLS + row * _PER_EXPORT

    def request(self, cmd: int, err: int, ns: int, data: int = 0, row: int = -1) -> None:
        """A request answered after `ns` nanoseconds, with NBD error `err` (0:
        none), having moved `data` bytes (a READ's or a WRITE's), on the
        export whose counters start at `row` (-1: none)."""
        a = self._acc
        k = cmd if cmd < _NCMD - 1 else _NCMD - 1
        a[REQUESTS + k] += 1
        if err:
            a[ERRORS + k * _NERR + _ERR_INDEX.get(err, _ERR_INDEX[Errno.EIO])] += 1
        elif data:
            a[BYTES_READ if cmd == 0 else BYTES_WRITTEN] += data
        a[LATENCY + k * _NBUCKET + bisect_left(_BOUNDS_NS, ns)] += 1
        a[LATENCY_SUM_NS + k] += ns
        if row >= 0:
            a[row + EXPORT_REQUESTS] += 1
            if err:
                a[row + EXPORT_ERRORS] += 1
            elif data:
                a[row + (EXPORT_READ if cmd == 0 else EXPORT_WRITTEN)] += data

    def reads(self, n: int, ns: int, data: int, row: int = -1) -> None:
        """`n` READs answered together after `ns` nanoseconds each, having
        read `data` bytes in all (the fast path's runs)."""
        a = self._acc
        k = _READ
        a[REQUESTS + k] += n
        a[BYTES_READ] += data
        a[LATENCY + k * _NBUCKET + bisect_left(_BOUNDS_NS, ns)] += n
        a[LATENCY_SUM_NS + k] += n * ns
        if row >= 0:
            a[row + EXPORT_REQUESTS] += n
            a[row + EXPORT_READ] += data

    def polled(self, ns: int, hit: bool) -> None:
        """A busy poll took `ns` nanoseconds and found bytes, or not."""
        a = self._acc
        a[POLLED_NS] += ns
        a[POLL_HITS if hit else POLL_MISSES] += 1

    def flush(self) -> None:
        """Publish what was counted since the last flush."""
        a, c = self._acc, self._c
        for i, n in enumerate(a):
            if n:
                c[i] += n
                a[i] = 0

    def opened(self) -> None:
        self._c[CONNECTIONS] += 1
        self._c[CONNECTIONS_TOTAL] += 1

    def closed(self) -> None:
        self._c[CONNECTIONS] -= 1

    def add(self, cell: int, n: int = 1) -> None:
        self._c[cell] += n

    def set(self, cell: int, value: int) -> None:
        self._c[cell] = value

    def upstream(self, up: bool) -> None:
        """The payload's upstream connection came (back) or went."""
        c = self._c
        if up and c[UPSTREAM] == UPSTREAM_DOWN:
            c[RECONNECTS] += 1
        c[UPSTREAM] = UPSTREAM_UP if up else UPSTREAM_DOWN


@dataclass(frozen=True)
class Totals:
    """All slots added up; gauges of slots whose process is gone are zero."""

    cells: list[int]
    upstream_states: list[int]  # one per slot
    exports: dict[str, list[int]] = field(default_factory=dict)  # name -> its 4 counters

    def __getitem__(self, cell: int) -> int:
        return self.cells[cell]

    def requests(self, k: int) -> int:
        return self.cells[REQUESTS + k]

    def errors(self, k: int) -> list[tuple[Errno, int]]:
        base = ERRORS + k * _NERR
        return [(e, self.cells[base + i]) for i, e in enumerate(ERRNOS) if self.cells[base + i]]

    def latency(self, k: int) -> tuple[list[int], int]:
        """Cumulative bucket counts (the last is +Inf) and the sum, ns."""
        out, total = [], 0
        for n in self.cells[LATENCY + k * _NBUCKET : LATENCY + (k + 1) * _NBUCKET]:
            total += n
            out.append(total)
        return out, self.cells[LATENCY_SUM_NS + k]

    @property
    def upstream(self) -> int | None:
        """UPSTREAM_UP/DOWN over every process that has one (DOWN if any is);
        None when no process serves an upstream."""
        known = [s for s in self.upstream_states if s != UPSTREAM_NONE]
        if not known:
            return None
        return UPSTREAM_DOWN if UPSTREAM_DOWN in known else UPSTREAM_UP


class StatsTable:
    """Slots for `processes` processes, shared with the children forked later;
    each with counters for up to `exports` exports, given rows by name in the
    parent (`add_exports`) before the processes that serve them fork."""

    def __init__(self, processes: int = 1, exports: int = 0) -> None:
        self.processes = processes
        self.capacity = exports
        self._width = _CELLS + exports * _PER_EXPORT
        self._mem = mmap.mmap(-1, processes * self._width * 8)  # MAP_SHARED | MAP_ANONYMOUS
        self._cells = memoryview(self._mem).cast("Q")
        self.rows: dict[str, int] = {}

    def add_exports(self, names: list[str]) -> list[str]:
        """Give rows to exports that have none; those left without (the
        table is full) are returned."""
        left = []
        for name in names:
            if name not in self.rows:
                if len(self.rows) < self.capacity:
                    self.rows[name] = len(self.rows)
                else:
                    left.append(name)
        return left

    def slot(self, index: int) -> Stats:
        w = self._width
        return Stats(self._cells[index * w : (index + 1) * w], self.rows)

    def process_gone(self, index: int) -> None:
        """A slot's process died: what it had open is not open any more."""
        for cell in _GAUGES:
            self._cells[index * self._width + cell] = 0

    def totals(self) -> Totals:
        w = self._width
        cells = [0] * w
        snapshot = self._cells.tolist()
        for i in range(self.processes):
            for j, v in enumerate(snapshot[i * w : (i + 1) * w]):
                cells[j] += v
        states = [snapshot[i * w + UPSTREAM] for i in range(self.processes)]
        exports = {name: cells[_CELLS + r * _PER_EXPORT : _CELLS + (r + 1) * _PER_EXPORT]
                   for name, r in self.rows.items()}
        return Totals(cells[:_CELLS], states, exports)
