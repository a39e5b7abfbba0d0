"""Bounded memory: a client that sends requests but reads no replies makes
the server stop reading, instead of buffering replies without end; clients
that stall (WRITE data that never comes, replies never read) hold only what
they sent, cannot take the memory budget from the others, and are closed
after the stall limit."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from pathlib import Path

from tests.conftest import children, wait_children
from tests.rawnbd import raw_connect, recv_exact, request, simple_reply

MiB = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def tree_rss_mib(pid: int) -> float:
    """The RSS of a server and its worker processes."""
    return sum(rss_mib(p) for p in [pid, *children(pid)])


def read_latencies(s: socket.socket, length: int, seconds: float) -> list[float]:
    """Reads of `length` bytes one at a time for `seconds`: their latencies (ms)."""
    out = []
    handle = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        handle += 1
        t = time.perf_counter()
        request(s, 0, handle, (handle * length) % (32 * MiB), length)
        assert simple_reply(s) == (0, handle)
        recv_exact(s, length)
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.005)
    return sorted(out)


def closed_by_server(socks: list[socket.socket], timeout: float, want: int) -> int:
    """How many of `socks` the server closes within `timeout` seconds (once
    `want` are), without reading what it sent: that would unstall a reader."""
    p = select.poll()
    for s in socks:
        p.register(s, select.POLLRDHUP)
    closed: set[int] = set()
    end = time.monotonic() + timeout
    while len(closed) < want and time.monotonic() < end:
        for fd, ev in p.poll(100):
            if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                closed.add(fd)
                p.unregister(fd)
    return len(closed)


def test_unread_replies_pause_the_connection(nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x33" * (8 * MiB))
    srv = nbdluks("--raw", str(disk), "--processes", "1", "--max-inflight", "16")
    assert srv.socket
    base = rss_mib(srv.proc.pid)
    s = raw_connect(srv.socket)
    n = 1000  # 1000 MiB of replies if the server kept going
    s.sendall(b"".join(
        struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 8) * MiB, MiB)
        for i in range(n)
    ))
    time.sleep(3)
    grown = rss_mib(srv.proc.pid) - base
    assert grown < 200, f"server buffered {grown:.0f} MiB for a client that reads nothing"
    # reading the replies lets everything finish, in order of completion
    seen = set()
    for _ in range(n):
        err, handle = simple_reply(s)
        assert err == 0
        assert recv_exact(s, MiB)[:4] == b"\x33" * 4
        seen.add(handle)
    assert seen == set(range(n))
    request(s, 2, 0, 0, 0)  # DISC
    assert srv.stop() == 0


def test_connections_beyond_the_limit_are_refused_while_all_are_busy(
        nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    srv = nbdluks("--raw", str(disk), "--processes", "1", "--max-connections", "2")
    assert srv.socket
    held = [raw_connect(srv.socket), raw_connect(srv.socket)]
    stop = threading.Event()

    def keep_busy() -> None:  # never idle long enough to be closed for a newcomer
        handle = 0
        while not stop.is_set():
            for s in held:
                handle += 1
                request(s, 0, handle, 0, 512)
                assert simple_reply(s) == (0, handle)
                recv_exact(s, 512)
            time.sleep(0.02)

    pinger = threading.Thread(target=keep_busy)
    pinger.start()
    try:
        time.sleep(0.3)
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(10)
            extra.connect(srv.socket)
            assert extra.recv(64) == b""  # closed without a greeting
    finally:
        stop.set()
        pinger.join(10)
    held.pop().close()
    for _ in range(50):  # the server notices the close on its next loop turn
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(srv.socket)
            if s.recv(8) == b"NBDMAGIC":
                break
        time.sleep(0.1)
    else:
        raise AssertionError("a slot that was freed was not given to a new client")
    held[0].close()
    assert "every slot is busy" in srv.log_text()


def test_slow_readers_share_one_memory_budget(nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x44" * (64 * MiB))
    srv = nbdluks("--raw", str(disk), "--processes", "1")  # the default budget: 256 MiB
    assert srv.socket
    base = rss_mib(srv.proc.pid)
    conns = [raw_connect(srv.socket) for _ in range(32)]
    for s in conns:  # 32 readers x 4 x 32 MiB, none of them reading
        s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 2) * 32 * MiB,
                                       32 * MiB) for i in range(4)))
    time.sleep(4)
    grown = rss_mib(srv.proc.pid) - base
    print(f"RSS grew by {grown:.0f} MiB")
    # without a budget each connection held 64 MiB: ~2 GiB here
    assert grown < 500, f"{grown:.0f} MiB held for 32 clients that read nothing"
    for s in conns[2:]:  # the others go: what they held is given back
        s.close()
    for s in conns[:2]:  # readers that catch up are served in full
        for _ in range(4):
            err, _handle = simple_reply(s)
            assert err == 0 and recv_exact(s, 32 * MiB)[:4] == b"\x44" * 4
    for s in conns[:2]:
        s.close()
    assert srv.stop() == 0


def test_stalled_writes_hold_only_what_they_sent_and_are_closed(nbdluks,
                                                                tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * MiB))
    srv = nbdluks("--raw", str(disk), "--processes", "2", "--stall-limit", "4")
    assert srv.socket
    wait_children(srv.proc.pid, 2)
    base = tree_rss_mib(srv.proc.pid)
    stalled = [raw_connect(srv.socket) for _ in range(8)]
    for i, s in enumerate(stalled):  # 64 MiB announced, 1 byte sent
        request(s, 1, i, 0, 64 * MiB, payload=b"x")
    time.sleep(0.5)
    t0 = time.monotonic()
    good = raw_connect(srv.socket)
    lat = read_latencies(good, 4096, 2)
    grown = tree_rss_mib(srv.proc.pid) - base
    print(f"4 KiB reads: p50 {lat[len(lat) // 2]:.2f} ms, p99 {lat[len(lat) * 99 // 100]:.2f}"
          f" ms, max {lat[-1]:.1f} ms; RSS grew by {grown:.0f} MiB")
    # before: the budget was charged 64 MiB per header, and reads waited (timed out)
    assert lat[len(lat) // 2] < 50 and lat[-1] < 2000
    assert grown < 64, f"{grown:.0f} MiB held for 8 bytes of WRITE data"
    # closed once the stall limit has passed, the others served on
    assert closed_by_server(stalled, 15 - (time.monotonic() - t0), want=8) == 8
    for s in stalled:
        s.close()
    request(good, 0, 1, 0, 4096)
    assert simple_reply(good) == (0, 1) and len(recv_exact(good, 4096)) == 4096
    request(good, 2, 0, 0, 0)  # DISC
    assert "WRITE data stalled" in srv.log_text()
    assert srv.stop() == 0


def test_slow_readers_cannot_take_the_budget_from_a_fresh_client(nbdluks,
                                                                 tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x55" * (64 * MiB))
    srv = nbdluks("--raw", str(disk), "--processes", "1", "--stall-limit", "5")
    assert srv.socket
    slow = [raw_connect(srv.socket) for _ in range(32)]
    for s in slow:  # 32 readers x 4 x 32 MiB, none of them reading
        s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 2) * 32 * MiB,
                                       32 * MiB) for i in range(4)))
    time.sleep(1)
    good = raw_connect(srv.socket)
    lat = read_latencies(good, 64 * 1024, 2)
    print(f"64 KiB reads: p50 {lat[len(lat) // 2]:.2f} ms, p99 {lat[len(lat) * 99 // 100]:.2f}"
          f" ms, max {lat[-1]:.1f} ms")
    # before: the slow readers held the whole budget; the fresh read timed out
    assert lat[len(lat) // 2] < 100 and lat[-1] < 2000
    # Those whose replies went unread past the stall limit are closed (the
    # others waited on the budget, not on their client: their turn comes later).
    assert closed_by_server(slow, 12, want=4) == 4
    for s in slow:
        s.close()
    request(good, 0, 1, 0, 32 * MiB)  # the budget is back for large reads too
    assert simple_reply(good) == (0, 1) and recv_exact(good, 32 * MiB)[:4] == b"\x55" * 4
    assert "replies not read" in srv.log_text()
    assert srv.stop() == 0
