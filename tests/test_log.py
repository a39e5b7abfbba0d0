"""Logging: JSON or console, and tracebacks without local variables (a
frame's locals may hold a passphrase or a key)."""

from __future__ import annotations

import json

import pytest
import structlog

from nbdluks import log as logsetup


def fail_with_secret() -> None:
    passphrase = "correct-horse-battery-staple"  # noqa: F841 - a local in the frame
    raise RuntimeError("boom")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_carry_no_locals(capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    logsetup.setup(fmt, "info")
    log = structlog.get_logger("t")
    try:
        fail_with_secret()
    except RuntimeError:
        log.exception("it failed", peer="x")
    err = capsys.readouterr().err
    assert "boom" in err and "it failed" in err
    assert "correct-horse" not in err
    if fmt == "json":
        rec = json.loads(err.strip().splitlines()[-1])
        assert rec["event"] == "it failed" and rec["level"] == "error" and rec["peer"] == "x"


def test_level_filter(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.setup("json", "warning")
    log = structlog.get_logger("t")
    log.info("quiet")
    log.warning("loud")
    err = capsys.readouterr().err
    assert "quiet" not in err and "loud" in err
