"""The default compose stack as a user runs it: `docker-compose up -d` with
./data/{header.img,payload.img,passphrase} made by cryptsetup, files as
their owners made them (mode 0600)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, need, pattern, run
from tests.containers.conftest import ROOT, Image
from tests.containers.engine import Engine
from tests.luks.reference import Made, fill, luks_format, read_plain

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1200)]

MiB = 1 << 20
SIZE = 32 * MiB


class Stack:
    """A compose file run as a project in a directory of its own."""

    def __init__(self, engine: Engine, project: Path, port: int,
                 file: Path = ROOT / "docker-compose.yml") -> None:
        self.engine = engine
        self.project = project
        self.port = port
        self.file = file
        self.name = f"nbdluks{port}"
        self.engine.env = {**engine.env, "NBDLUKS_PORT": str(port)}

    @property
    def command(self) -> list[str]:
        return ["docker-compose", "-p", self.name, "-f", str(self.file),
                "--project-directory", str(self.project)]

    def compose(self, *args: str, timeout: float = 300) -> str:
        return self.engine.run(*self.command, *args, timeout=timeout).stdout

    def container(self) -> str:
        return self.compose("ps", "-q", "nbdluks").strip()

    def state(self) -> dict[str, object]:
        out = self.engine.docker("inspect", "--format", "{{json .State}}", self.container())
        return json.loads(out.stdout)  # type: ignore[no-any-return]

    def wait_healthy(self, timeout: float = 120) -> float:
        started = time.monotonic()
        while True:
            state = self.state()
            health = state.get("Health") or {}
            if health.get("Status") == "healthy":  # type: ignore[union-attr]
                return time.monotonic() - started
            assert state.get("Running"), f"the container stopped: {self.logs()}"
            assert time.monotonic() - started < timeout, f"never healthy: {self.logs()}"
            time.sleep(0.3)

    def logs(self) -> str:
        return self.compose("logs", "--no-color")

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"


def make_data(project: Path, owner: int) -> tuple[Made, bytes]:
    data = project / "data"
    data.mkdir(parents=True)
    made = luks_format(data, detached=True, size=SIZE, name="vol")
    assert made.header
    plain = pattern(SIZE, seed=21)
    fill(made, plain)
    made.header.rename(data / "header.img")
    made.payload.rename(data / "payload.img")
    (data / "vol.pass").rename(data / "passphrase")
    for f in data.iterdir():
        os.chown(f, owner, owner)
        f.chmod(0o600)
    made = Made(data / "payload.img", data / "header.img", made.key, made.passphrase,
                made.offset, made.sector_size, made.cipher)
    return made, plain


def stack_with_tools(engine: Engine, tmp_path: Path, tag: str, dockerfile: Path,
                     file: Path) -> Iterator[Stack]:
    """A stack whose other services run an image built from `dockerfile`."""
    engine.docker("build", "-q", "-t", tag, "-f", str(dockerfile), str(dockerfile.parent),
                  timeout=1200)
    s = Stack(Engine(engine.state), tmp_path / "project", free_port(), file)
    yield s
    s.compose("down", "-v", "--remove-orphans")


@pytest.fixture
def stack(engine: Engine, image: Image, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(Engine(engine.state), tmp_path / "project", free_port())
    yield s
    s.compose("down", "-v", "--remove-orphans")


@pytest.mark.parametrize("owner", [0, 1000], ids=["root-owned", "user-owned"])
def test_default_stack_serves_writes_stops_and_restarts(stack: Stack, owner: int) -> None:
    need("nbdcopy", "qemu-io", "cryptsetup")
    made, plain = make_data(stack.project, owner)
    stack.compose("up", "-d", "--no-build")
    to_healthy = stack.wait_healthy()
    print(f"\nup -> healthy in {to_healthy:.1f} s")
    out = stack.project / "copy.img"
    run(["nbdcopy", stack.uri, str(out)])
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(plain).digest()
    # a write lands encrypted in ./data/payload.img
    run(["qemu-io", "-f", "raw", "-c", f"write -P 0x7e {4 * MiB} {MiB}", stack.uri])
    logs = stack.logs()
    assert '"uid": 10809' in logs  # served as the unprivileged user
    started = time.monotonic()
    stack.compose("stop", "-t", "30")
    assert time.monotonic() - started < 10
    assert stack.state()["ExitCode"] == 0, stack.logs()
    assert read_plain(made, MiB, at=4 * MiB) == b"\x7e" * MiB
    assert read_plain(made, MiB, at=8 * MiB) == plain[8 * MiB : 9 * MiB]
    # restart: the data is still there
    stack.compose("start")
    stack.wait_healthy()
    run(["qemu-io", "-f", "raw", "-r", "-c", f"read -P 0x7e {4 * MiB} {MiB}", stack.uri])
    stack.compose("stop")
    assert stack.state()["ExitCode"] == 0


def test_stop_during_the_unlock_is_prompt_and_clean(stack: Stack) -> None:
    """A slow KDF (Argon2 with a large cost) is still running when docker stops it."""
    need("cryptsetup")
    data = stack.project / "data"
    data.mkdir(parents=True)
    made = luks_format(data, detached=True, size=MiB, pbkdf="argon2id",
                       extra=("--pbkdf-memory", "1048576"))
    assert made.header
    made.header.rename(data / "header.img")
    made.payload.rename(data / "payload.img")
    shutil.move(data / "vol.pass", data / "passphrase")
    stack.compose("up", "-d", "--no-build")
    time.sleep(1.5)  # unlocking now
    assert "volume unlocked" not in stack.logs()
    started = time.monotonic()
    stack.compose("stop", "-t", "30")
    assert time.monotonic() - started < 10
    assert stack.state()["ExitCode"] == 0, stack.logs()


@pytest.mark.vm
def test_a_guest_kernel_attaches_the_published_export(stack: Stack) -> None:
    """nbd-client in a VM guest, through the port the stack publishes."""
    need("cryptsetup", "qemu-system-x86_64", "socat")
    from tests.vm.test_vm import CHECKS, PATTERN_AT, attach, guest_pattern, run_vm

    made, plain = make_data(stack.project, 0)
    stack.compose("up", "-d", "--no-build")
    stack.wait_healthy()
    vm = run_vm(stack.project, stack.port,
                f"PATTERN_AT={PATTERN_AT}\n" + attach(2, 4096) + CHECKS
                + "nbd-client -d /dev/nbd0\n")
    assert not [r for r in vm.results if r[0].endswith("failed")], vm.console[-3000:]
    assert vm.get("size") == (str(SIZE),)
    assert vm.get("sha256") == (hashlib.sha256(plain).hexdigest(),)
    assert vm.get("readback") == (hashlib.sha256(guest_pattern()).hexdigest(),)
    stack.compose("stop")
    assert stack.state()["ExitCode"] == 0
    assert read_plain(made, MiB, at=PATTERN_AT) == guest_pattern()
