"""The counters: exact across forked processes, gauges cleared for a dead one."""

from __future__ import annotations

import os

from nbdluks.nbd import stats
from nbdluks.nbd.constants import Cmd, Errno
from nbdluks.nbd.stats import COMMANDS, StatsTable


def test_counts_of_forked_processes_add_up_exactly() -> None:
    table = StatsTable(3)
    pids = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:
            s = table.slot(i)
            for _ in range(1000 * (i + 1)):
                s.request(Cmd.READ, 0, 50_000, 4096)
            s.request(Cmd.WRITE, Errno.ENOSPC, 2_000_000)
            s.opened()
            s.flush()
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    t = table.totals()
    assert t.requests(Cmd.READ) == 6000
    assert t[stats.BYTES_READ] == 6000 * 4096
    assert t.errors(Cmd.WRITE) == [(Errno.ENOSPC, 3)]
    assert t[stats.CONNECTIONS] == 3
    table.process_gone(1)
    assert table.totals()[stats.CONNECTIONS] == 2
    assert table.totals()[stats.CONNECTIONS_TOTAL] == 3  # a counter stays


def test_latency_buckets_are_cumulative_and_bounded_by_le() -> None:
    table = StatsTable()
    one = table.slot(0)
    # exactly 0.0001 s (in le="0.0001"), just over, beyond the last bound (+Inf only)
    for ns in (100_000, 100_001, 60 * 10**9):
        one.request(Cmd.FLUSH, 0, ns)
    one.flush()
    counts, total_ns = table.totals().latency(Cmd.FLUSH)
    assert counts[0] == 1 and counts[1] == 2 and counts[-2] == 2 and counts[-1] == 3
    assert total_ns == 100_000 + 100_001 + 60 * 10**9


def test_unknown_commands_and_errnos_have_a_row() -> None:
    table = StatsTable()
    s = table.slot(0)
    s.request(200, 99, 1)
    assert table.totals().requests(COMMANDS.index("unknown")) == 0  # not flushed yet
    s.flush()
    t = table.totals()
    assert t.requests(COMMANDS.index("unknown")) == 1
    assert t.errors(COMMANDS.index("unknown")) == [(Errno.EIO, 1)]


def test_upstream_state_and_reconnects() -> None:
    table = StatsTable(2)
    assert table.totals().upstream is None  # nobody watches an upstream
    a, b = table.slot(0), table.slot(1)
    a.upstream(True)
    b.upstream(True)
    assert table.totals().upstream == stats.UPSTREAM_UP
    b.upstream(False)
    assert table.totals().upstream == stats.UPSTREAM_DOWN
    b.upstream(True)
    t = table.totals()
    assert t.upstream == stats.UPSTREAM_UP and t[stats.RECONNECTS] == 1
    b.upstream(False)
    table.process_gone(1)  # a dead worker's connection does not count as down
    assert table.totals().upstream == stats.UPSTREAM_UP


def test_per_export_counters() -> None:
    table = StatsTable(2, exports=2)
    assert table.add_exports(["a", "b", "c"]) == ["c"]  # the table holds two
    assert table.add_exports(["b", "a"]) == []  # rows are kept by name
    one, two = table.slot(0), table.slot(1)
    assert one.row("c") == -1
    one.request(int(Cmd.READ), 0, 1000, 4096, one.row("a"))
    two.request(int(Cmd.READ), 0, 1000, 512, two.row("a"))
    two.request(int(Cmd.WRITE), 0, 1000, 1024, two.row("b"))
    two.request(int(Cmd.WRITE), int(Errno.EIO), 1000, 0, two.row("b"))
    one.request(int(Cmd.FLUSH), 0, 1000, 0, one.row("c"))  # totals only
    one.flush()
    two.flush()
    t = table.totals()
    assert t.exports == {"a": [2, 0, 4608, 0], "b": [2, 1, 0, 1024]}
    assert t.requests(int(Cmd.READ)) == 2 and t.requests(int(Cmd.FLUSH)) == 1
