"""`nbdluks probe`: exit 0 and one line while an export serves, 1 when it
does not; a probe does not clutter the server's log at info level."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdluks", "probe", *args],
                          capture_output=True, text=True, timeout=60)


def test_probe_up_and_down(nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    srv = nbdluks("--raw", str(disk))
    p = probe(srv.uri)
    assert p.returncode == 0 and p.stdout.strip().endswith("size=1048576"), p.stdout
    p = probe(srv.uri, "--read")
    assert p.returncode == 0 and p.stdout.strip().endswith("size=1048576 read=4096")
    records = [json.loads(line) for line in srv.log_text().splitlines()]
    closed = [r for r in records if r["event"] == "connection closed"]
    assert {r["level"] for r in closed if r["requests"] == 0} <= {"debug"}
    assert [r["bytes_read"] for r in closed if r["requests"]] == [4096]
    assert srv.stop() == 0
    p = probe(srv.uri)
    assert p.returncode == 1 and p.stdout.startswith("down: cannot connect")
    assert len(p.stdout.strip().splitlines()) == 1


def test_probe_refuses_a_bad_uri(tmp_path: Path) -> None:
    p = probe("nbd://[::1/")
    assert p.returncode == 2 and "Invalid IPv6 URL" in p.stderr
