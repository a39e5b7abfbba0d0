"""A Tang-bound volume served by a container with no secret mounted: the
Tang server runs in its own container on the compose network."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need, pattern, run
from tests.containers.conftest import ROOT, Image
from tests.containers.engine import Engine
from tests.containers.test_compose import Stack, stack_with_tools
from tests.luks.reference import fill, luks_format

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1200)]

MiB = 1 << 20
COMPOSE = ROOT / "deploy" / "compose"
TANGD = "/usr/libexec/tangd"


@pytest.fixture
def tang_stack(engine: Engine, image: Image, tmp_path: Path) -> Iterator[Stack]:
    yield from stack_with_tools(engine, tmp_path, "nbdluks-tang:latest",
                                COMPOSE / "tang.Dockerfile", COMPOSE / "tang.yml")


def advertisement(db: Path) -> bytes:
    """What the Tang server with keys `db` advertises (tangd answers on stdio)."""
    out = subprocess.run([TANGD, str(db)], input=b"GET /adv HTTP/1.1\r\n\r\n",
                         capture_output=True, check=True, timeout=30).stdout
    return out.split(b"\r\n\r\n", 1)[1]


def test_no_secret_in_the_container(tang_stack: Stack) -> None:
    need("cryptsetup", "clevis", "nbdcopy", TANGD)
    project = tang_stack.project
    (project / "data").mkdir(parents=True)
    (project / "tang-db").mkdir()
    run(["/usr/libexec/tangd-keygen", str(project / "tang-db")])
    (project / "adv.jws").write_bytes(advertisement(project / "tang-db"))
    made = luks_format(project / "data", detached=True, size=8 * MiB, name="vol")
    assert made.header
    plain = pattern(8 * MiB, seed=41)
    fill(made, plain)
    run(["clevis", "luks", "bind", "-d", str(made.header), "-k",
         str(project / "data" / "vol.pass"), "tang",
         json.dumps({"url": "http://tang", "adv": str(project / "adv.jws")})], timeout=120)
    made.header.rename(project / "data" / "header.img")
    made.payload.rename(project / "data" / "payload.img")
    (project / "data" / "vol.pass").unlink()  # nobody has the passphrase any more

    tang_stack.compose("up", "-d", "--no-build")
    tang_stack.wait_healthy()
    out = project / "copy.img"
    run(["nbdcopy", tang_stack.uri, str(out)])
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(plain).digest()
    assert '"unlocked through a token"' in tang_stack.logs()
    mounts = json.loads(tang_stack.engine.docker(
        "inspect", "--format", "{{json .Mounts}}", tang_stack.container()).stdout)
    assert sorted(m["Destination"] for m in mounts) == ["/data/header.img",
                                                         "/data/payload.img"]
    tang_stack.compose("stop")
    assert tang_stack.state()["ExitCode"] == 0
