"""Logging: JSON or console, tracebacks without local variables (a frame's
locals may hold a passphrase or a key), whole lines from every process, and
fatal errors in the chosen format."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
import structlog

from nbdluks.daemon import log as logsetup


def fail_with_secret() -> None:
    passphrase = "correct-horse-battery-staple"  # noqa: F841 - a local in the frame
    raise RuntimeError("boom")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_carry_no_locals(capfd: pytest.CaptureFixture[str], fmt: str) -> None:
    logsetup.setup(fmt, "info")
    log = structlog.get_logger("t")
    try:
        fail_with_secret()
    except RuntimeError:
        log.exception("it failed", peer="x")
    err = capfd.readouterr().err
    assert "boom" in err and "it failed" in err
    assert "correct-horse" not in err
    if fmt == "json":
        rec = json.loads(err.strip().splitlines()[-1])
        assert rec["event"] == "it failed" and rec["level"] == "error" and rec["peer"] == "x"


def test_level_filter(capfd: pytest.CaptureFixture[str]) -> None:
    logsetup.setup("json", "warning")
    log = structlog.get_logger("t")
    log.info("quiet")
    log.warning("loud")
    err = capfd.readouterr().err
    assert "quiet" not in err and "loud" in err


def test_fatal_errors_in_the_chosen_format(capfd: pytest.CaptureFixture[str]) -> None:
    logsetup.setup("json", "info")
    logsetup.fatal("the header is truncated", 1)
    rec = json.loads(capfd.readouterr().err)
    assert rec["error"] == "the header is truncated" and rec["exit_status"] == 1
    logsetup.setup("console", "info")
    logsetup.fatal("the header is truncated", 1)
    assert capfd.readouterr().err == "nbdluks: the header is truncated\n"


def test_worker_processes_never_interleave_lines(nbdluks, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    os.environ["PYTHONUNBUFFERED"] = "1"  # what made lines merge before
    try:
        srv = nbdluks("--raw", str(disk), "--processes", "2")
    finally:
        del os.environ["PYTHONUNBUFFERED"]
    assert srv.socket

    def churn(n: int) -> None:
        for _ in range(n):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(srv.socket)
                s.recv(18)
                s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 2, 0))
                s.recv(20)  # ABORT's ACK

    threads = [threading.Thread(target=churn, args=(100,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert srv.stop() == 0
    lines = srv.log_text().splitlines()
    assert len(lines) > 800
    for line in lines:
        json.loads(line)  # every line whole: no two records merged or split
