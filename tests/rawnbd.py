"""A minimal NBD client for tests, written straight from the spec with
struct: independent of nbdluks' own codec, for what libnbd will not send."""

from __future__ import annotations

import socket
import struct


def raw_connect(path: str, structured: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    s.connect(path)
    greeting = recv_exact(s, 18)
    assert greeting[:8] == b"NBDMAGIC" and greeting[8:16] == b"IHAVEOPT"
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if structured:
        s.sendall(b"IHAVEOPT" + struct.pack(">II", 8, 0))
        hdr = recv_exact(s, 20)
        assert struct.unpack(">QIII", hdr)[2] == 1  # ACK
    payload = struct.pack(">I", 0) + struct.pack(">H", 0)
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 7, len(payload)) + payload)
    while True:
        _, _opt, rep, length = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, length)
        if rep == 1:
            return s
        assert rep == 3, rep  # INFO


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def request(s: socket.socket, cmd: int, handle: int, offset: int, length: int,
            flags: int = 0, payload: bytes = b"") -> None:
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length) + payload)


def simple_reply(s: socket.socket) -> tuple[int, int]:
    magic, err, handle = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698
    return err, handle
