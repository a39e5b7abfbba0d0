"""The upstream client against a real server (nbdkit)."""

from __future__ import annotations

import errno
import json
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdluks.nbd.client import NbdClientError
from nbdluks.nbd.constants import REQUEST_SIZE, TxFlag
from nbdluks.nbd.handshake import ExportInfo, Handshake, State
from nbdluks.nbd.upstream import NbdDevice, UpstreamOptions
from nbdluks.nbd.uri import NbdUri
from nbdluks.nbd.wire import encode_offset_data_header, encode_offset_hole
from tests.conftest import SYSTEM_PYTHON, libnbd, need, wait_listening

MiB = 1 << 20


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[object]:
    need("nbdkit")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> NbdUri:
        sock = str(tmp_path / f"k{len(procs)}.sock")
        log = tmp_path / f"k{len(procs)}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(["nbdkit", "-f", "-U", sock, *args], stdout=f,
                                 stderr=subprocess.STDOUT)
        procs.append(p)
        wait_listening(p, sock, None, log)
        return NbdUri("", socket=sock)

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_read_write_flush_zero_trim_and_pipelining(nbdkit) -> None:  # type: ignore[no-untyped-def]
    dev = NbdDevice(nbdkit("memory", "64M"))
    try:
        assert dev.size == 64 * MiB and dev.caps.writable and dev.caps.flush
        dev.pwrite(b"\x42" * (40 * MiB), 0, fua=True)  # larger than one request: split
        buf = bytearray(40 * MiB)
        dev.pread_into(memoryview(buf), 0)
        assert buf == b"\x42" * (40 * MiB)
        dev.write_zeroes(MiB, MiB)
        dev.trim(2 * MiB, MiB)
        dev.flush()
        out = bytearray(4096)
        dev.pread_into(memoryview(out), MiB)
        assert out == bytes(4096)

        def worker(k: int) -> None:
            for i in range(50):
                off = (k * 50 + i) * 4096
                dev.pwrite(bytes([k + 1]) * 4096, off)
                b = bytearray(4096)
                dev.pread_into(memoryview(b), off)
                assert b == bytes([k + 1]) * 4096

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        dev.close()


def test_upstream_errors_keep_their_errno(nbdkit) -> None:  # type: ignore[no-untyped-def]
    dev = NbdDevice(nbdkit("--filter=error", "memory", "1M", "error-pread=EIO",
                           "error-pread-rate=1", "error-pwrite=ENOSPC",
                           "error-pwrite-rate=1"))
    try:
        with pytest.raises(OSError) as e:
            dev.pread_into(memoryview(bytearray(512)), 0)
        assert e.value.errno == errno.EIO
        with pytest.raises(OSError) as e:
            dev.pwrite(b"x" * 512, 0)
        assert e.value.errno == errno.ENOSPC
    finally:
        dev.close()


def test_read_only_upstream_and_missing_export(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("--readonly", "memory", "1M")
    dev = NbdDevice(uri)
    try:
        assert not dev.caps.writable
        with pytest.raises(OSError) as e:
            dev.pwrite(b"x", 0)
        assert e.value.errno == errno.EPERM
    finally:
        dev.close()
    with pytest.raises(NbdClientError, match="cannot connect"):
        NbdDevice(NbdUri("", socket="/nonexistent.sock"))


def _hostile_upstream(path: Path, answer: Callable[[socket.socket, int, int, int], None]
                      ) -> threading.Thread:
    """A one-request NBD server that answers a READ with `answer` (an upstream
    that breaks the protocol, which no real server here does on purpose)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            hs = Handshake({"": ExportInfo("", MiB, TxFlag.HAS_FLAGS)})
            conn.sendall(hs.data_to_send())
            while hs.state is not State.DONE:
                data = conn.recv(65536)
                if not data:
                    return
                hs.receive_data(data)
                conn.sendall(hs.data_to_send())
            head = hs.leftover
            while len(head) < REQUEST_SIZE:
                head += conn.recv(REQUEST_SIZE - len(head))
            _, _, _, handle, offset, length = struct.unpack(">IHHQQI", head[:REQUEST_SIZE])
            answer(conn, handle, offset, length)
            conn.recv(1024)  # until the client hangs up

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _data(conn: socket.socket, handle: int, offset: int, n: int, done: bool) -> None:
    conn.sendall(encode_offset_data_header(handle, offset, n, done) + bytes([7]) * n)


@pytest.mark.parametrize("case", ["complete", "gap", "overlap"])
def test_a_read_reply_must_cover_the_request(tmp_path: Path, case: str) -> None:
    """Read buffers are reused: bytes the upstream did not send would be stale
    bytes of an earlier request, so a reply with a gap is EIO."""
    def answer(conn: socket.socket, handle: int, offset: int, length: int) -> None:
        half = length // 2
        if case == "complete":
            _data(conn, handle, offset, half, False)
            conn.sendall(encode_offset_hole(handle, offset + half, length - half, True))
        elif case == "gap":
            _data(conn, handle, offset, half, True)
        else:  # as many bytes as asked, but the first half twice
            _data(conn, handle, offset, half, False)
            _data(conn, handle, offset, half, True)

    path = tmp_path / "hostile.sock"
    t = _hostile_upstream(path, answer)
    dev = NbdDevice(NbdUri("", socket=str(path)), options=UpstreamOptions(timeout=10))
    buf = bytearray(b"\xee") * 65536
    try:
        if case == "complete":
            dev.pread_into(memoryview(buf), 4096)
            assert buf == bytes([7]) * 32768 + bytes(32768)
        else:
            with pytest.raises(OSError) as e:
                dev.pread_into(memoryview(buf), 4096)
            assert e.value.errno == errno.EIO
            assert "did not cover" in str(e.value)
    finally:
        dev.close()
    t.join(5)


def test_failing_requests_do_not_flood_the_log(nbdkit, nbdluks) -> None:  # type: ignore[no-untyped-def]
    need(SYSTEM_PYTHON)
    uri = nbdkit("--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=1")
    srv = nbdluks("--raw", str(uri), "--processes", "1")
    script = r"""
h.connect_uri(sys.argv[1])
failed = 0
for i in range(500):
    try:
        h.pread(512, 0)
    except nbd.Error:
        failed += 1
print(failed)
"""
    assert libnbd(script, srv.uri).strip() == "500"
    assert srv.stop() == 0
    lines = [json.loads(x) for x in srv.log_text().splitlines()]
    failures = [r for r in lines if r["event"] == "request failed"]
    assert 1 <= len(failures) <= 20, len(failures)  # about one a second
    assert len(failures) + sum(r["held_back"] for r in failures) <= 500
    closed = [r for r in lines if r["event"] == "connection closed" and r["requests"] >= 500]
    assert [r["failed"] for r in closed] == [500]  # every one counted
