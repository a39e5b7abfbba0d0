"""Helpers for the lifecycle commands, judged by cryptsetup: run
`nbdluks CMD`, ask cryptsetup whether a key opens, and put a header file
behind nbdkit when the source under test is an NBD export."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Upstream, need

# Fast KDFs: tests measure behaviour, not the cost an attacker pays.
PBKDF2 = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
ARGON2 = ("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32",
          "--pbkdf-parallel", "1")
MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("cryptsetup")


def cli(*args: str | Path, check: bool = True, input: bytes | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "nbdluks", *map(str, args), "--log-format", "json"]
    p = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout)
    out = subprocess.CompletedProcess(cmd, p.returncode, p.stdout.decode(), p.stderr.decode())
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {p.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def opens(header: Path, key: Path, payload: Path | None = None) -> bool:
    """Whether cryptsetup opens the volume with the key file's bytes."""
    cmd = ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key)]
    if payload is not None and payload != header:
        cmd += ["--header", str(header), str(payload)]
    else:
        cmd.append(str(header))
    return subprocess.run(cmd, capture_output=True).returncode == 0


def dump(path: Path) -> str:
    return subprocess.run(["cryptsetup", "luksDump", str(path)], capture_output=True,
                          text=True, check=True).stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def keyfile(tmp: Path, name: str, secret: bytes | None = None) -> Path:
    path = tmp / name
    path.write_bytes(secret if secret is not None else name.encode())
    return path


@pytest.fixture(params=["file", "nbd"])
def source(request: pytest.FixtureRequest, tmp_path: Path
           ) -> Iterator[Callable[..., str]]:
    """How a header file is given to nbdluks: its path, or an nbdkit export of it."""
    started: list[Upstream] = []

    def give(path: Path, *, read_only: bool = False) -> str:
        if request.param == "file":
            return str(path)
        need("nbdkit")
        up = Upstream("nbdkit", path, tmp_path, tcp=False, read_only=read_only)
        started.append(up)
        return up.uri

    yield give
    for up in started:
        up.stop()
