"""Worker processes: several accept on the same listeners; partial-sector
writes from different processes never lose each other; a dead worker is
replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import (
    SYSTEM_PYTHON,
    children,
    log_events,
    need,
    pattern,
    run,
    wait_children,
)
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
    for rec in log_events(log, "export negotiated"):
        if "worker" in rec:
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
    kids = wait_children(srv.proc.pid, 2)
    os.kill(kids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = children(srv.proc.pid)
        if len(now) == 2 and kids[0] not in now:
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
    wait_children(srv.proc.pid, 0 if processes == "1" else int(processes))
    assert srv.stop() == 0


HAMMER = r"""
import nbd, sys, time
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
n = 0
try:
    while time.monotonic() < end:  # 512-byte pieces: every write is a read-modify-write
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(512)), (n * 1536) % (1 << 20))
        n += 1
        while h.aio_in_flight() > 32:
            h.poll(-1)
except nbd.Error:
    pass  # our worker was killed
"""


def test_worker_killed_during_partial_writes_never_wedges_the_others(
        nbdluks, tmp_path: Path) -> None:
    need("cryptsetup", SYSTEM_PYTHON)
    made = luks_format(tmp_path, sector_size=4096, detached=True, size=MiB)
    (tmp_path / "pw").write_bytes(made.passphrase)
    assert made.header
    srv = nbdluks("--payload", str(made.payload), "--header", str(made.header),
                  "--passphrase-file", str(tmp_path / "pw"), "--processes", "2")
    for _round in range(3):
        hammers = [subprocess.Popen([SYSTEM_PYTHON, "-c", HAMMER, srv.uri, "3"])
                   for _ in range(4)]
        time.sleep(0.7)
        before = wait_children(srv.proc.pid, 2)
        os.kill(before[0], signal.SIGKILL)  # likely inside a read-modify-write
        deadline = time.monotonic() + 20
        while len(set(children(srv.proc.pid)) - set(before)) < 1:
            assert time.monotonic() < deadline, "no replacement worker"
            time.sleep(0.05)
        for h in hammers:
            h.wait(timeout=60)
    # every worker still serves partial-sector writes, promptly
    for _ in range(4):
        out = run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 100 1000",
                   "-c", "read -P 0x5a 100 1000", srv.uri], timeout=20).stdout
        assert "verification failed" not in out
    assert read_plain(made, 4096)[100:1100] == b"\x5a" * 1000
    assert srv.stop(timeout=20) == 0


def test_workers_stop_when_their_supervisor_is_killed(nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    srv = nbdluks("--raw", str(disk), "--processes", "2")
    workers = wait_children(srv.proc.pid, 2)
    srv.proc.kill()
    srv.proc.wait()
    deadline = time.monotonic() + 15
    while any(running(w) for w in workers):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        time.sleep(0.1)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _ids(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])  # effective


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_drops_root_after_opening_root_only_files(nbdluks, tmp_path: Path) -> None:
    """Files only root may read (0600) open before the switch; every process
    then runs as the user, and reads and writes still work."""
    need("cryptsetup", SYSTEM_PYTHON)
    import pwd

    nobody = pwd.getpwnam("nobody")
    made = luks_format(tmp_path, detached=True, size=SECTORS * 4096)
    assert made.header
    for f in (made.header, made.payload, tmp_path / "vol.pass"):
        os.chmod(f, 0o600)
    srv = nbdluks("--payload", str(made.payload), "--header", str(made.header),
                  "--passphrase-file", str(tmp_path / "vol.pass"), "--processes", "2",
                  "--user", "nobody")
    kids = wait_children(srv.proc.pid, 2)
    for pid in (srv.proc.pid, *kids):
        assert _ids(pid) == (nobody.pw_uid, nobody.pw_gid)
    data = pattern(64 * 1024, seed=3)
    out = run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {len(data)}", "-c",
               f"read -P 0x5a 0 {len(data)}", srv.uri]).stdout
    assert "verification failed" not in out and "failed" not in out
    assert read_plain(made, 64 * 1024) == b"\x5a" * 64 * 1024
    assert srv.stop() == 0


def test_user_that_does_not_exist_is_refused_before_the_unlock(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--raw", "/dev/null",
                        "--user", "no-such-user-here", "-k", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--user no-such-user-here: no user" in p.stderr


def test_user_owns_its_unix_socket_and_removes_it(tmp_path: Path) -> None:
    """With --user and -k, the socket file belongs to the user (its clients
    connect as that user) and goes away at exit; --socket-mode sets its mode."""
    import pwd
    import stat

    need("nbdinfo", "runuser")
    nobody = pwd.getpwnam("nobody")
    # like /tmp: anyone may create, the owner removes (and nobody can reach it)
    public = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(public, 0o1777)
    disk = tmp_path / "disk.img"
    disk.write_bytes(pattern(1 << 20, seed=5))
    sock = public / "s.sock"
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "nbdluks", "serve", "--raw", str(disk),
                                 "-k", str(sock), "--socket-mode", "660", "--user", "nobody",
                                 "--processes", "2", "--log-format", "json"],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        from tests.conftest import wait_listening

        wait_listening(proc, str(sock), None, log)
        st = os.stat(sock)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert stat.S_IMODE(st.st_mode) == 0o660
        size = run(["runuser", "-u", "nobody", "--", "nbdinfo", "--size",
                    f"nbd+unix:///?socket={sock}"]).stdout
        assert int(size) == 1 << 20
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not sock.exists(), log.read_text()
    public.rmdir()


def test_socket_mode_is_checked(tmp_path: Path) -> None:
    for mode, message in (("999", "--socket-mode 999: give permissions in octal"),
                          ("1777", "--socket-mode 1777"), ("rw", "--socket-mode rw")):
        p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--raw", "/dev/null",
                            "-k", str(tmp_path / "s.sock"), "--socket-mode", mode],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and message in p.stderr, p.stderr
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--raw", "/dev/null",
                        "--socket-mode", "660"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--socket-mode needs -k/--socket" in p.stderr
