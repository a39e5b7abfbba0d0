"""Busy polling (nbd/poll.py, the C poll in _transmit.c): the next request
awaited on the CPU, given up at the budget, for another socket's bytes and
at the end; polling turned off by a client that is not quick and on again
once it is; and through a served export, reads and writes exact while the
metrics show the polls."""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdluks.nbd import fastpath
from nbdluks.nbd.poll import COOLDOWN, Poller
from nbdluks.nbd.stats import POLL_HITS, POLL_MISSES, POLLED_NS, StatsTable
from tests.conftest import SYSTEM_PYTHON, free_port, need, run
from tests.daemon.test_metrics import parse, sample, scrape, wait_for

pytestmark = pytest.mark.skipif(not fastpath.AVAILABLE,
                                reason="the C helper is not built, or NBDLUKS_NATIVE=0")
LONG = 5_000_000_000  # a budget no test waits out


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_bytes_sent_while_it_polls_are_returned(pair: tuple[socket.socket, socket.socket]
                                                ) -> None:
    a, b = pair
    sender = threading.Timer(0.01, b.sendall, (b"x" * 28,))
    sender.start()
    got = fastpath.poll(a.fileno(), -1, LONG)
    sender.join()
    assert got == b"x" * 28


def test_at_most_a_chunk_is_taken_and_the_rest_stays(pair: tuple[socket.socket, socket.socket]
                                                    ) -> None:
    a, b = pair
    data = random.randbytes(100_000)
    b.sendall(data)
    got = fastpath.poll(a.fileno(), -1, LONG)
    assert got is not None and 0 < len(got) <= 64 * 1024
    rest = b""
    while len(got) + len(rest) < len(data):
        rest += a.recv(1 << 20)
    assert got + rest == data


def test_nothing_within_the_budget_gives_none(pair: tuple[socket.socket, socket.socket]) -> None:
    a, _ = pair
    start = time.perf_counter_ns()
    assert fastpath.poll(a.fileno(), -1, 2_000_000) is None
    assert time.perf_counter_ns() - start >= 2_000_000


def test_it_gives_way_to_another_socket_of_the_set(pair: tuple[socket.socket, socket.socket]
                                                  ) -> None:
    a, _ = pair
    c, d = socket.socketpair()
    with select.epoll() as ep, c, d:
        ep.register(a.fileno(), select.EPOLLIN)
        ep.register(c.fileno(), select.EPOLLIN)
        start = time.monotonic()
        d.sendall(b"for the event loop")
        assert fastpath.poll(a.fileno(), ep.fileno(), LONG) == b""
        assert time.monotonic() - start < 2
        assert c.recv(100) == b"for the event loop"  # left for its reader


def test_it_stops_at_the_end_for_the_event_loop(pair: tuple[socket.socket, socket.socket]
                                               ) -> None:
    a, b = pair
    b.close()
    start = time.monotonic()
    assert fastpath.poll(a.fileno(), -1, LONG) == b""
    assert time.monotonic() - start < 2
    assert a.recv(10) == b""  # still there to be read


def test_a_client_not_quick_or_pipelining_turns_polling_off_until_it_is_quick(
        pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    table = StatsTable()
    stats = table.slot(0)
    poll = Poller(100_000).watch(a.fileno())  # 100 ms: "soon" is within 200
    served = 0

    def counts() -> tuple[int, int, int]:
        stats.flush()
        t = table.totals()
        return t[POLL_HITS], t[POLL_MISSES], t[POLLED_NS]

    def answered(n: int = 1) -> bool:  # n requests came and were answered: poll now?
        nonlocal served
        served += n
        return poll.wants(served)

    def through_the_loop(late: bool = False) -> None:
        if late:
            time.sleep(0.5)
        poll.arrived(served)

    def cooled_down() -> None:  # COOLDOWN requests, each alone and soon: polling on
        for i in range(COOLDOWN):
            through_the_loop()
            assert answered() == (i == COOLDOWN - 1)

    b.sendall(b"1")
    assert answered() and poll.wait(stats) == b"1"
    assert counts()[:2] == (1, 0)
    assert answered() and poll.wait(stats) is None  # nothing came: a miss, polling off
    hits, misses, ns = counts()
    assert (hits, misses) == (1, 1) and ns >= 100_000_000
    cooled_down()
    assert answered() and poll.wait(stats) is None  # off again
    for _ in range(COOLDOWN // 2):
        through_the_loop()
        assert not answered()
    through_the_loop(late=True)  # one came late before the count was done: it starts again
    assert not answered()
    cooled_down()
    assert not answered(3)  # several requests in one read: a pipelining client
    cooled_down()
    b.sendall(b"2")
    assert poll.wait(stats) == b"2"  # polling again
    assert counts()[:2] == (2, 2)
    poll.close()


def test_no_budget_no_polling(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    b.sendall(b"x")
    assert not Poller(0).watch(a.fileno()).wants(1)
    assert not Poller(50).watch(-1).wants(1)  # a TLS connection's socket is not ours


# A client at queue depth 1, as latency-bound ones are: each read checked
# against the data written, writes and flushes between them.
QD1 = r"""
import nbd, random, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rng = random.Random(int(sys.argv[2]))
shadow = bytearray(h.pread(size, 0))
for i in range(3000):
    off = rng.randrange(0, size // 4096) * 4096
    if i % 10 == 9:
        data = rng.randbytes(4096)
        h.pwrite(data, off)
        shadow[off:off + 4096] = data
    elif i % 100 == 99:
        h.flush()
    else:
        n = rng.choice([512, 4096, 65536])
        off = min(off, size - n)
        assert h.pread(n, off) == shadow[off:off + n], (i, off, n)
h.shutdown()
print("ok")
"""


@pytest.mark.parametrize("budget", ["1000", "0"])
def test_a_queue_depth_1_client_is_polled_for_and_served_exactly(
        nbdluks, tmp_path: Path, budget: str) -> None:
    need(SYSTEM_PYTHON)
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.randbytes(4 << 20))
    fd = os.open(disk, os.O_RDONLY)  # in the page cache: the fast path takes the reads
    os.fsync(fd)
    os.close(fd)
    port = free_port()
    srv = nbdluks("--raw", str(disk), "--processes", "1", "--metrics", str(port),
                  "--busy-poll", budget)
    assert run([SYSTEM_PYTHON, "-c", QD1, srv.uri, "7"]).stdout.strip() == "ok"
    wait_for(lambda: sample(parse(scrape(port)[1]), "nbdluks_connections_active") == 0,
             "the connection to close")
    s = parse(scrape(port)[1])
    found = sample(s, "nbdluks_busy_polls_total", found="yes")
    spent = sample(s, "nbdluks_busy_poll_seconds_total")
    if budget == "0":
        assert found == 0 and spent == 0
    else:
        # Most requests came while polled for, unless the machine is so busy
        # that the client is seldom that quick; some did at least.
        assert found > 0 and spent > 0
