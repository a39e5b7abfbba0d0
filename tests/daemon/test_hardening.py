"""Key material stays out of core dumps: the serving processes are not
dumpable and may not write a core; the volume key is locked in memory where
the limits allow."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.conftest import log_events, need, wait_children
from tests.luks.reference import luks_format

MiB = 1 << 20


def test_serving_processes_are_not_dumpable(nbdluks, tmp_path: Path) -> None:
    need("cryptsetup")
    made = luks_format(tmp_path, detached=True, size=MiB)
    assert made.header
    srv = nbdluks("--payload", str(made.payload), "--header", str(made.header),
                  "--passphrase-file", str(tmp_path / "vol.pass"), "--processes", "2")
    pids = [srv.proc.pid, *wait_children(srv.proc.pid, 2)]
    for pid in pids:  # the parent keeps the key for new workers; the workers use it
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file"))
        assert core.split()[4:6] == ["0", "0"], core
    records = [json.loads(line) for line in srv.log_text().splitlines()]
    hardened = next(r for r in records if r["event"] == "process hardened")
    assert hardened["dumpable"] == 0 and hardened["core_limit"] == 0
    unlocked = next(r for r in records if r["event"] == "volume unlocked")
    assert unlocked["key_locked_in_memory"] is True  # root here: mlock is allowed
    assert vmlck_kib(srv.proc.pid) > 0  # the parent's key, for new workers
    # mlock is not inherited: each worker locks its own copies, and says so
    # with what the kernel counts (before: no line, VmLck 0 in the workers)
    for _ in range(100):
        lines = log_events(srv.log_text(), "keys in memory")
        if len(lines) == 2:
            break
        time.sleep(0.1)
    assert sorted(r["pid"] for r in lines) == sorted(pids[1:])
    for r in lines:
        assert r["key_locked_in_memory"] is True and r["locked_kib"] > 0
        assert vmlck_kib(r["pid"]) >= r["locked_kib"]
    assert srv.stop() == 0


def vmlck_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck")
