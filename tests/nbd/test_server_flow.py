"""Bounded memory: a client that sends requests but reads no replies makes
the server stop reading, instead of buffering replies without end."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

from tests.rawnbd import raw_connect, recv_exact, request, simple_reply

MiB = 1 << 20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


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
    for s in conns[:2]:  # readers that catch up are served in full
        for _ in range(4):
            err, _handle = simple_reply(s)
            assert err == 0 and recv_exact(s, 32 * MiB)[:4] == b"\x44" * 4
    for s in conns:
        s.close()
    assert srv.stop() == 0
