"""Bad requests get the errno the spec names, and the connection serves on."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import libnbd
from tests.rawnbd import raw_connect, recv_exact, request, simple_reply

MiB = 1024 * 1024
SIZE = 8 * MiB

# python3-libnbd reports errno names
ERRNO = {n: n for n in ("EPERM", "EIO", "EINVAL", "ENOSPC", "ENOTSUP")}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\x5a" * SIZE)
    return p


LIBNBD_CASES = r"""
import json
uri = sys.argv[1]
h.connect_uri(uri)
size = h.get_size()
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = 0
    except nbd.Error as e:
        out[name] = e.errno
    # the connection must still serve
    assert h.pread(4, size - 4) == b"\x5a" * 4, name
cases = {
    "read_past_end": lambda: h.pread(512, size - 256),
    "read_offset_past_end": lambda: h.pread(1, size + 4096),
    "write_past_end": lambda: h.pwrite(b"x" * 512, size - 256),
    "zero_past_end": lambda: h.zero(512, size),
    "trim_past_end": lambda: h.trim(4096, size),
    "cache_past_end": lambda: h.cache(4096, size),
    "read_zero_length": lambda: h.pread(0, 0),
    "write_zero_length": lambda: h.pwrite(b"", 0),
    "write_unknown_flag": lambda: h.pwrite(b"y" * 512, 0, nbd.CMD_FLAG_REQ_ONE),
    "read_unknown_flag": lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE),
    "read_fua": lambda: h.pread(512, 0, nbd.CMD_FLAG_FUA),  # legal, and ignored
    "flush_fua": lambda: h.flush(nbd.CMD_FLAG_FUA),
    "read_ok": lambda: h.pread(512, 4096),
    "write_ok": lambda: h.pwrite(b"z" * 512, 4096, nbd.CMD_FLAG_FUA),
    "fast_zero": lambda: h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO),
}
for name, fn in cases.items():
    attempt(name, fn)
print(json.dumps(out))
"""


def test_bad_requests_get_spec_errnos(nbdluks, disk: Path) -> None:
    srv = nbdluks("--raw", str(disk))
    got = json.loads(libnbd(LIBNBD_CASES, srv.uri))
    assert got == {
        "read_past_end": ERRNO["EINVAL"],
        "read_offset_past_end": ERRNO["EINVAL"],
        "write_past_end": ERRNO["ENOSPC"],
        "zero_past_end": ERRNO["ENOSPC"],
        "trim_past_end": ERRNO["EINVAL"],
        "cache_past_end": ERRNO["EINVAL"],
        "read_zero_length": ERRNO["EINVAL"],
        "write_zero_length": ERRNO["EINVAL"],
        "write_unknown_flag": ERRNO["EINVAL"],
        "read_unknown_flag": ERRNO["EINVAL"],
        "read_fua": 0,
        "flush_fua": 0,
        "read_ok": 0,
        "write_ok": 0,
        "fast_zero": 0,
    }
    data = disk.read_bytes()
    assert data[:65536] == bytes(65536)  # write_ok, then fast_zero over it
    assert data[65536:] == b"\x5a" * (SIZE - 65536)  # nothing else changed
    assert len(data) == SIZE  # nothing written past the end


def test_requests_up_to_64_mib_and_no_larger(nbdluks, tmp_path: Path) -> None:
    # libnbd itself refuses to send more than 64 MiB: speak the protocol directly
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(80 << 20)
    srv = nbdluks("--raw", str(big))
    assert srv.socket
    s = raw_connect(srv.socket)
    request(s, 1, 1, 0, 64 << 20, payload=b"\x77" * (64 << 20))  # WRITE of 64 MiB
    assert simple_reply(s) == (0, 1)
    request(s, 1, 2, 0, (64 << 20) + 512, payload=bytes((64 << 20) + 512))  # skipped
    assert simple_reply(s) == (22, 2)  # EINVAL, and the stream stays in sync
    request(s, 0, 3, (64 << 20) - 4, 4)
    assert simple_reply(s) == (0, 3) and recv_exact(s, 4) == b"\x77" * 4
    request(s, 0, 4, 0, (64 << 20) + 512)
    assert simple_reply(s) == (22, 4)
    s.close()
    assert big.read_bytes()[:64 << 20] == b"\x77" * (64 << 20)


def test_read_only_export_refuses_writes_with_eperm(nbdluks, disk: Path) -> None:
    srv = nbdluks("--raw", str(disk), "-r")
    script = r"""
import json
h.connect_uri(sys.argv[1])
out = {}
for name, fn in {
    "write": lambda: h.pwrite(b"x" * 512, 0),
    "zero": lambda: h.zero(512, 0),
    "trim": lambda: h.trim(512, 0),
}.items():
    try:
        fn(); out[name] = 0
    except nbd.Error as e:
        out[name] = e.errno
out["read"] = h.pread(4, 0).hex()
h.flush()
print(json.dumps(out))
"""
    got = json.loads(libnbd(script, srv.uri))
    assert got == {"write": "EPERM", "zero": "EPERM", "trim": "EPERM", "read": "5a5a5a5a"}
    assert disk.read_bytes() == b"\x5a" * SIZE


# --- what libnbd cannot send: spoken on a raw socket, independently of our codec


def test_unknown_command_einval_and_serves_on(nbdluks, disk: Path) -> None:
    srv = nbdluks("--raw", str(disk))
    assert srv.socket
    s = raw_connect(srv.socket)
    request(s, 42, 1, 0, 512)
    assert simple_reply(s) == (22, 1)
    request(s, 0, 2, 0, 4)  # READ
    assert simple_reply(s) == (0, 2)
    assert recv_exact(s, 4) == b"\x5a" * 4
    # BLOCK_STATUS without a negotiated meta context
    request(s, 7, 3, 0, 512)
    assert simple_reply(s) == (22, 3)
    request(s, 2, 4, 0, 0)  # DISC
    assert s.recv(1) == b""


def test_pipelined_requests_answered_by_handle(nbdluks, disk: Path) -> None:
    srv = nbdluks("--raw", str(disk))
    assert srv.socket
    s = raw_connect(srv.socket)
    for i in range(64):
        request(s, 1, 1000 + i, i * 4096, 4096, payload=bytes([i]) * 4096)
    handles = {simple_reply(s) for _ in range(64)}
    assert handles == {(0, 1000 + i) for i in range(64)}
    request(s, 3, 5000, 0, 0)  # FLUSH
    assert simple_reply(s) == (0, 5000)
    data = disk.read_bytes()
    assert all(data[i * 4096 : (i + 1) * 4096] == bytes([i]) * 4096 for i in range(64))


def test_structured_read_error_is_an_error_chunk(nbdluks, disk: Path) -> None:
    srv = nbdluks("--raw", str(disk))
    assert srv.socket
    s = raw_connect(srv.socket, structured=True)
    request(s, 0, 9, SIZE, 512)
    magic, flags, ctype, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (magic, flags, ctype, handle) == (0x668E33EF, 1, 0x8001, 9)
    body = recv_exact(s, length)
    assert struct.unpack(">I", body[:4])[0] == 22
    # DF read gets one data chunk
    request(s, 0, 10, 0, 8192, flags=0x4)
    magic, flags, ctype, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (flags, ctype, handle, length) == (1, 1, 10, 8 + 8192)
    assert recv_exact(s, length)[8:] == b"\x5a" * 8192


def test_disconnect_waits_for_requests_in_flight(nbdluks, disk: Path) -> None:
    srv = nbdluks("--raw", str(disk))
    assert srv.socket
    s = raw_connect(srv.socket)
    for i in range(8):
        request(s, 1, i, i * MiB, MiB, payload=b"\x77" * MiB)
    request(s, 2, 99, 0, 0)
    replies = {simple_reply(s) for _ in range(8)}
    assert replies == {(0, i) for i in range(8)}
    assert s.recv(1) == b""
    assert disk.read_bytes()[: 8 * MiB] == b"\x77" * (8 * MiB)


def test_structured_reads_skip_holes_when_it_pays(nbdluks, tmp_path: Path) -> None:
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\x11" * 65536)  # data, then a hole
    srv = nbdluks("--raw", str(img))
    assert srv.socket
    s = raw_connect(srv.socket, structured=True)
    request(s, 0, 1, 0, 256 * 1024)
    _, flags, ctype, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (flags, ctype, handle, length) == (0, 1, 1, 8 + 65536)  # OFFSET_DATA
    assert recv_exact(s, length) == struct.pack(">Q", 0) + b"\x11" * 65536
    _, flags, ctype, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (flags, ctype, handle, length) == (1, 2, 1, 12)  # OFFSET_HOLE, done
    assert struct.unpack(">QI", recv_exact(s, 12)) == (65536, 192 * 1024)
    # a small read is sent as data even where there is a hole
    request(s, 0, 2, MiB, 4096)
    _, flags, ctype, handle, length = struct.unpack(">IHHQI", recv_exact(s, 20))
    assert (flags, ctype, handle, length) == (1, 1, 2, 8 + 4096)
    assert recv_exact(s, length)[8:] == bytes(4096)
