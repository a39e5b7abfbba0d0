"""kill -9 at random moments of add-key, change-key, remove-key, bind and
format, 100 runs in all (the bind test, last, prints the tally), on headers
behind nbdkit whose writes are slowed (its delay filter) so that the kills
land inside the writes as often as before them. After every run cryptsetup
must open the volume with every key that opened it before and that the
change did not remove, with the new key when the command reported success,
and nbdluks must agree with cryptsetup about each of those keys."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import need, wait_listening
from tests.luks.reference import Made, add_key, luks_format
from tests.manage.conftest import PBKDF2, MiB, cli, keyfile, opens
from tests.unlock.test_tokens import TANGD, Tang

pytestmark = pytest.mark.slow
OUTCOMES: Counter[str] = Counter()


class Slow:
    """nbdkit serving a header file with every write delayed."""

    def __init__(self, path: Path, tmp: Path) -> None:
        self.sock = tmp / f"{path.name}.sock"
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "--filter=delay",
             "file", str(path), "delay-write=15ms"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.proc, str(self.sock), None, tmp / "nbdkit.log")
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def nbdluks_opens(made: Made, header: Path, key: Path | None) -> bool:
    args = ["--key-file", str(key)] if key else ["--token-only"]
    p = cli("inspect", header, *args, "--json", check=False)
    return bool(p.stdout) and json.loads(p.stdout).get("key_check", {}).get("ok", False)


def judge(made: Made, header: Path, key: Path) -> bool:
    """cryptsetup's verdict, which nbdluks must share."""
    verdict = opens(header, key, made.payload)
    assert nbdluks_opens(made, header, key) == verdict, f"nbdluks and cryptsetup disagree on {key}"
    return verdict


def killed_runs(argv: list[str], runs: int, seed: int, header: Path, pristine: Path,
                check: Callable[[bool], None]) -> None:
    """Run `argv` `runs` times from the pristine header, killing it at a
    random moment (or letting it finish), and check what it left."""
    rng = random.Random(seed)

    def reset() -> None:
        shutil.copyfile(pristine, header)

    reset()
    start = time.monotonic()
    subprocess.run(argv, capture_output=True, check=True, timeout=120)
    full = time.monotonic() - start  # one whole run: the kills are spread over it
    reset()
    for _ in range(runs):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.wait(rng.uniform(0.3, 1.3) * full)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.wait()
        ok = proc.returncode == 0
        if ok:
            OUTCOMES["completed"] += 1
        else:
            changed = header.read_bytes() != pristine.read_bytes()
            OUTCOMES["killed while writing" if changed else "killed before writing"] += 1
        check(ok)
        reset()


@pytest.fixture(scope="module")
def tang(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tang]:
    need("clevis", "socat", TANGD, "nbdkit")
    server = Tang(tmp_path_factory.mktemp("tang"), "crash")
    yield server
    server.stop()


def _setup(tmp: Path, version: int) -> tuple[Made, Path, Path, Path, Path]:
    made = luks_format(tmp, version=version, size=32 * MiB, detached=True)
    k0, k1, k2 = tmp / "vol.pass", keyfile(tmp, "k1"), keyfile(tmp, "k2")
    add_key(made.header_path, k0, k1)
    pristine = tmp / "pristine"
    shutil.copyfile(made.header_path, pristine)
    return made, pristine, k0, k1, k2


@pytest.mark.parametrize(("version", "command", "runs"), [
    (2, "add-key", 14), (2, "change-key", 14), (2, "remove-key", 14), (2, "format", 14),
    (1, "add-key", 10), (1, "change-key", 10), (1, "remove-key", 10)])
def test_a_kill_at_any_moment_keeps_the_volume_openable(
        tmp_path: Path, version: int, command: str, runs: int) -> None:
    need("nbdkit")
    made, pristine, k0, k1, k2 = _setup(tmp_path, version)
    header = made.header_path
    slow = Slow(header, tmp_path)
    try:
        argv = [sys.executable, "-m", "nbdluks", command, "--header", slow.uri,
                "--log-level", "error"]
        if command == "add-key" or command == "change-key":
            argv += ["--key-file", str(k1), "--new-key-file", str(k2), *PBKDF2]
        elif command == "remove-key":
            argv += ["--key-file", str(k1)]
        else:
            argv += ["--payload", str(made.payload), "--key-file", str(k2), "--force", *PBKDF2]

        def check(ok: bool) -> None:
            if command != "format":  # format --force gives up the old volume on purpose
                assert judge(made, header, k0), "a key the change did not touch stopped working"
            if command == "add-key":
                assert judge(made, header, k1)
                assert not ok or judge(made, header, k2)
            elif command == "change-key":
                assert judge(made, header, k1) or judge(made, header, k2)
                assert not ok or (judge(made, header, k2) and not judge(made, header, k1))
            elif command == "remove-key":
                assert not ok or not judge(made, header, k1)
            else:
                assert not ok or (judge(made, header, k2) and not judge(made, header, k0))

        killed_runs(argv, runs, zlib.crc32(f"{version}{command}".encode()), header, pristine,
                    check)
    finally:
        slow.stop()


def test_a_kill_during_bind_leaves_no_orphan(tmp_path: Path, tang: Tang) -> None:
    """A binding lands whole (slot and token in one header write) or not at all."""
    made, pristine, k0, k1, _ = _setup(tmp_path, 2)
    header = made.header_path
    adv = json.loads(subprocess.run(["curl", "-s", f"{tang.url}/adv"], capture_output=True,
                                    check=True).stdout)
    slow = Slow(header, tmp_path)
    try:
        argv = [sys.executable, "-m", "nbdluks", "bind", "tang",
                json.dumps({"url": tang.url, "adv": adv}), "--header", slow.uri,
                "--key-file", str(k0), "--log-level", "error", *PBKDF2]

        def check(ok: bool) -> None:
            assert judge(made, header, k0) and judge(made, header, k1)
            dumped = subprocess.run(["cryptsetup", "luksDump", str(header)],
                                    capture_output=True, text=True, check=True).stdout
            bound = "clevis" in dumped
            slots = dumped.count(": luks2\n")
            assert slots == (3 if bound else 2), "a key slot without its token, or the reverse"
            assert not ok or (bound and nbdluks_opens(made, header, None))

        killed_runs(argv, 14, 7, header, pristine, check)
    finally:
        slow.stop()
    print("crash runs:", dict(OUTCOMES))
    assert OUTCOMES["killed while writing"] and OUTCOMES["completed"], OUTCOMES
