"""Malformed streams thrown at a live server: no crash, no hang, and other
connections keep being served."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

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


def test_live_server_survives_garbage(nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x42" * (1 << 20))
    srv = nbdluks("--raw", str(disk))
    assert srv.socket
    path = srv.socket
    # A bystander connection that stays open the whole time.
    bystander = raw_connect(path)

    def check_bystander(handle: int) -> None:
        request(bystander, 0, handle, 4096, 16)
        assert simple_reply(bystander) == (0, handle)
        assert recv_exact(bystander, 16) == b"\x42" * 16

    counter = iter(range(1, 10**9))

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
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
