"""`serve --config`: every mistake in the file is one line naming the file,
the table and the key, exit 2, before anything is unlocked; the command line
overrides [server]."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbdluks.cli.arguments import explicit_options, serve_parser
from nbdluks.cli.config import load
from nbdluks.cli.options import UsageError

GOOD = """
[server]
port = 10999
processes = 2
stall-limit = 7.5
busy-poll = 0

[exports.a]
payload = "/nonexistent/a.img"
passphrase-file = "/nonexistent/a.pass"
header = ["/nonexistent/a.hdr", "/nonexistent/a.bak"]
description = "disk a"
read-only = true

[exports.b]
raw = "/nonexistent/b.img"
"""


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "exports.toml"
    path.write_text(text)
    return str(path)


def test_a_good_file(tmp_path: Path) -> None:
    cfg = load(config(tmp_path, GOOD), serve_parser(), explicit_options(["serve"]))
    assert cfg.server.port == 10999 and cfg.server.processes == 2
    assert cfg.server.stall_limit == 7.5 and cfg.server.busy_poll == 0
    a, b = cfg.exports
    assert (a.name, a.payload, a.headers, a.description) == (
        "a", "/nonexistent/a.img", ("/nonexistent/a.hdr", "/nonexistent/a.bak"), "disk a")
    assert a.options.read_only and a.keys.passphrase_file == "/nonexistent/a.pass"
    assert (b.name, b.raw, b.options.read_only) == ("b", "/nonexistent/b.img", False)


def test_the_command_line_overrides_server(tmp_path: Path) -> None:
    given = explicit_options(["serve", "-p", "10998", "--max-memory", "64"])
    cfg = load(config(tmp_path, GOOD), serve_parser(), given)
    assert cfg.server.port == 10998 and cfg.server.max_memory == 64
    assert cfg.server.processes == 2  # from the file


@pytest.mark.parametrize(("text", "message"), [
    ("[exports.a]\nraw = 1\n", "[exports.a] raw: must be a string"),
    ("[exports.a]\nraw = 'x'\nread-only = 'yes'\n", "[exports.a] read-only: must be true or false"),
    ("[exports.a]\nraw = 'x'\nfrobnicate = 1\n", "[exports.a] frobnicate: unknown key"),
    ("[exports.a]\nraw = 'x'\nport = 1\n", "[exports.a] port: unknown key"),
    ("[server]\npayload = 'x'\n", "[server] payload: unknown key"),
    ("[server]\nport = 70000\n", "[server] -p/--port 70000: must be 1..65535"),
    ("[server]\ntls = 'maybe'\n", "[server] tls: must be one of off, on, require"),
    ("[server]\nstall-limit = 0\n", "[server] --stall-limit must be more than 0 seconds"),
    ("[exports.a]\npayload = 'x'\nkey-slot = 99\n", "[exports.a] --key-slot 99: must be 0..31"),
    ("[exports.a]\n", "[exports.a] nothing to serve"),
    ("[exports.a]\nraw = 'x'\npayload = 'y'\n", "[exports.a] --raw cannot be combined"),
    ("[exports.a]\nraw = 'x'\nheader = [1]\n", "[exports.a] header: must be a string or a list"),
    ("[exports.a]\nraw = 'x'\n[exports.a]\nraw = 'y'\n", "Cannot declare ('exports', 'a') twice"),
    ("[export.a]\nraw = 'x'\n", "unknown table [export]"),
    ("exports = 3\n", "[server] and [exports.NAME] must be tables"),
    ("[exports]\na = 3\n", "[exports.a] must be a table"),
])
def test_mistakes_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = config(tmp_path, text)
    with pytest.raises(UsageError) as e:
        load(path, serve_parser(), explicit_options(["serve"]))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_serve_exits_2_before_unlocking(tmp_path: Path) -> None:
    path = config(tmp_path, "[exports.a]\npayload = '/nonexistent'\nkey-slot = -1\n")
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--config", path],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "[exports.a] --key-slot -1" in lines[0], p.stderr
    missing = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--config",
                              str(tmp_path / "none.toml")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "No such file" in missing.stderr


def test_volume_options_belong_in_the_file(tmp_path: Path) -> None:
    path = config(tmp_path, GOOD)
    with pytest.raises(UsageError, match="--payload: with --config"):
        load(path, serve_parser(), explicit_options(["serve", "--payload", "x"]))
