"""Malformed streams thrown at a live server: no crash, no hang, and other
connections keep being served."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rawnbd import raw_connect, recv_exact, request, simple_reply

REQ_MAGIC = struct.pack(">I", 0x25609513)

requests = st.builds(
    lambda flags, cmd, off, ln, extra: REQ_MAGIC
    + struct.pack(">HHQQI", flags, cmd, 7, off, ln)
    + extra,
    st.integers(0, 0xFFFF),
    st.integers(0, 10),
    st.one_of(st.integers(0, 1 << 20), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1)),
    st.binary(max_size=64),
)


@pytest.mark.parametrize("read_only", [True, False])
def test_live_server_survives_garbage(nbdluks, tmp_path: Path, read_only: bool) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x42" * (1 << 20))
    srv = nbdluks("--raw", str(disk), *(["-r"] if read_only else []))
    assert srv.socket
    path = srv.socket
    # A bystander connection that stays open the whole time.
    bystander = raw_connect(path)

    def bystander_read(handle: int) -> bytes:
        request(bystander, 0, handle, 4096, 16)
        assert simple_reply(bystander) == (0, handle)
        return recv_exact(bystander, 16)

    def check_bystander(handle: int) -> None:
        data = bystander_read(handle)
        if read_only:
            assert data == b"\x42" * 16
            return
        # Writable, the garbage may hold valid writes (WRITE_ZEROES of the
        # first 8 KiB is an easy one), and one may still be landing when
        # the fuzzing client sees EOF: then what the bystander reads must
        # match what the file holds.
        for _ in range(20):
            with open(disk, "rb") as f:
                f.seek(4096)
                if data == f.read(16):
                    return
            time.sleep(0.05)
            data = bystander_read(handle + 10**8)
        raise AssertionError("the bystander read something the file does not hold")

    counter = iter(range(1, 10**9))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        pre=st.binary(max_size=200),
        negotiated=st.booleans(),
        reqs=st.lists(requests, max_size=6),
    )
    def one(pre: bytes, negotiated: bool, reqs: list[bytes]) -> None:
        if negotiated:
            s = raw_connect(path, structured=True)
            payload = b"".join(reqs)
        else:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            payload = pre
        s.settimeout(2)
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)  # the server sees EOF and closes
            # Drain whatever comes back, up to a short idle timeout.
            while s.recv(65536):
                pass
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            s.close()
        check_bystander(next(counter))

    one()
    assert srv.proc.poll() is None, "server died"
    assert srv.stop() == 0
    log = srv.log_text()
    assert "Traceback" not in log and "request crashed" not in log
    if read_only:
        assert disk.read_bytes() == b"\x42" * (1 << 20)
