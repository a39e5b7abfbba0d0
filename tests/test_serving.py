"""Worker processes: several accept on the same listeners; partial-sector
writes from different processes never lose each other; a dead worker is
replaced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import SYSTEM_PYTHON, need, pattern, run
from tests.luks.reference import fill, luks_format, read_plain

MiB = 1 << 20

SECTORS = 1024

WRITER = r"""
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
parity = int(sys.argv[2])
# 512-byte pieces of 4096-byte sectors, many in flight at once; the other
# client writes the pieces in between. Each piece is written once, so a lost
# update stays visible.
for sector in range(int(sys.argv[3])):
    for piece in range(parity, 8, 2):
        n = sector * 8 + piece
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([n % 251 + 1]) * 512), n * 512)
    while h.aio_in_flight() > 64:
        h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
print("ok")
"""


def expected(sectors: int) -> bytes:
    return b"".join(bytes([n % 251 + 1]) * 512 for n in range(sectors * 8))


def workers(log: str) -> list[int]:
    """The worker of each negotiated connection, in order."""
    out = []
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "export negotiated" and "worker" in rec:
            out.append(rec["worker"])
    return out


def test_sub_sector_writes_from_two_processes_both_survive(nbdluks, tmp_path: Path) -> None:
    need("cryptsetup", SYSTEM_PYTHON)
    made = luks_format(tmp_path, sector_size=4096, detached=True, size=SECTORS * 4096)
    (tmp_path / "pw").write_bytes(made.passphrase)
    assert made.header
    srv = nbdluks("--payload", str(made.payload), "--header", str(made.header),
                  "--passphrase-file", str(tmp_path / "pw"), "--processes", "2")
    seen: list[int] = []
    for _attempt in range(8):  # until the two clients land on different workers
        fill(made, bytes(SECTORS * 4096))
        procs = [subprocess.Popen([SYSTEM_PYTHON, "-c", WRITER, srv.uri, str(p), str(SECTORS)],
                                  stdout=subprocess.PIPE, text=True) for p in (0, 1)]
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert out.strip() == "ok"
        assert read_plain(made, SECTORS * 4096) == expected(SECTORS)
        seen = workers(srv.log_text())[-2:]
        if len(set(seen)) == 2:
            break
    assert set(seen) == {0, 1}, "the connections never reached both workers"


def test_dead_worker_is_replaced(nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x11" * MiB)
    srv = nbdluks("--raw", str(disk), "--processes", "2")
    kids = [int(p) for p in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children")
            .read_text().split()]
    assert len(kids) == 2
    os.kill(kids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
        if len(now) == 2 and str(kids[0]) not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no replacement worker")
    for _ in range(4):
        out = run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x11 0 64k", srv.uri]).stdout
        assert "verification failed" not in out
    assert srv.stop() == 0
    assert "worker exited unexpectedly" in srv.log_text()


@pytest.mark.parametrize("processes", ["1", "3"])
def test_process_counts(nbdluks, tmp_path: Path, processes: str) -> None:
    need("nbdcopy")
    disk = tmp_path / "disk.img"
    data = pattern(8 * MiB, seed=5)
    disk.write_bytes(data)
    srv = nbdluks("--raw", str(disk), "--processes", processes)
    out = tmp_path / "out"
    run(["nbdcopy", "-C", "4", srv.uri, str(out)])
    assert out.read_bytes() == data
    kids = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
    assert len(kids) == (0 if processes == "1" else int(processes))
    assert srv.stop() == 0
