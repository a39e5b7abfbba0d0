"""Idle floods cannot lock clients out: silent connections time out and make
room, clients that negotiate and idle make room when every slot is taken."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

from tests.conftest import need, run
from tests.rawnbd import raw_connect


def test_a_client_is_served_during_a_flood_of_silent_connections(nbdluks,
                                                                 tmp_path: Path) -> None:
    need("nbdinfo")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    srv = nbdluks("--raw", str(disk))
    assert srv.socket
    flood = []
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX)
        s.connect(srv.socket)  # and never a byte sent
        flood.append(s)
    try:
        t = time.monotonic()
        assert run(["nbdinfo", "--size", srv.uri], timeout=30).stdout.strip() == "1048576"
        assert time.monotonic() - t < 5
    finally:
        for s in flood:
            s.close()
    assert "connection closed to make room" in srv.log_text()
    assert srv.stop() == 0


def test_idle_clients_make_room_when_every_slot_is_taken(nbdluks, tmp_path: Path) -> None:
    need("nbdinfo")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    srv = nbdluks("--raw", str(disk), "--max-connections", "4", "--processes", "1")
    assert srv.socket
    idle = [raw_connect(srv.socket) for _ in range(4)]  # negotiated, then quiet
    try:
        time.sleep(1.5)
        assert run(["nbdinfo", "--size", srv.uri], timeout=30).stdout.strip() == "1048576"
    finally:
        for s in idle:
            s.close()
    assert "idle longest while every slot is taken" in srv.log_text()
    assert srv.stop() == 0


def test_silent_connections_are_closed_after_the_handshake_limit(nbdluks,
                                                                 tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    srv = nbdluks("--raw", str(disk), "--handshake-limit", "1")
    assert srv.socket
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(srv.socket)
        t = time.monotonic()
        assert len(s.recv(18)) == 18  # the greeting, then nothing from us
        s.sendall(struct.pack(">I", 3))
        assert s.recv(1) == b""  # closed by the server
        assert 0.5 < time.monotonic() - t < 5
    assert "negotiation timed out" in srv.log_text()
