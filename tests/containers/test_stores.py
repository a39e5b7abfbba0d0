"""The two-store stack (deploy/compose/stores.yml): header and payload on
their own nbdkit servers, the header store reachable only with TLS and a
client certificate, nbdluks combining them, a client container attaching
the decrypted export."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need, pattern, run
from tests.containers.conftest import ROOT, Image
from tests.containers.engine import Engine
from tests.containers.test_compose import Stack, stack_with_tools
from tests.luks.reference import fill, luks_format, read_plain

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.timeout(1200)]

MiB = 1 << 20
COMPOSE = ROOT / "deploy" / "compose"


@pytest.fixture
def stores(engine: Engine, image: Image, tmp_path: Path) -> Iterator[Stack]:
    yield from stack_with_tools(engine, tmp_path, "nbdluks-nbd-tools:latest",
                                COMPOSE / "nbd-tools.Dockerfile", COMPOSE / "stores.yml")


def test_two_stores_with_a_certificate_gated_header(stores: Stack) -> None:
    need("cryptsetup", "nbdcopy", "qemu-io")
    project = stores.project
    (project / "data").mkdir(parents=True)
    run([str(COMPOSE / "make-pki"), str(project / "pki")])
    made = luks_format(project / "data", detached=True, size=16 * MiB, name="vol")
    assert made.header
    plain = pattern(16 * MiB, seed=31)
    fill(made, plain)
    made.header.rename(project / "data" / "header.img")
    made.payload.rename(project / "data" / "payload.img")
    (project / "data" / "vol.pass").rename(project / "data" / "passphrase")
    for f in (project / "data").iterdir():
        f.chmod(0o600)

    stores.compose("up", "-d", "--no-build", "nbdluks")
    stores.wait_healthy()
    # the client container attaches the decrypted export over the compose network
    info = stores.compose("run", "--rm", "client")
    assert "export-size: 16777216" in info
    digest = stores.compose("run", "--rm", "client", "sh", "-c",
                            "nbdcopy nbd://nbdluks/ - | sha256sum")
    assert digest.split()[0] == hashlib.sha256(plain).hexdigest()
    # a write from this host lands encrypted in the payload store's file
    run(["qemu-io", "-f", "raw", "-c", f"write -P 0x3c {2 * MiB} 65536", stores.uri])
    stores.compose("stop", "nbdluks")
    made = type(made)(project / "data" / "payload.img", project / "data" / "header.img",
                      made.key, made.passphrase, made.offset, made.sector_size, made.cipher)
    assert read_plain(made, 65536, at=2 * MiB) == b"\x3c" * 65536

    # the header store refuses a client without a certificate of its CA ...
    anon = subprocess.run(
        [*stores.command, "run", "--rm", "client", "nbdinfo", "--size",
         "nbds://header-store/?tls-certificates=/pki/anon"],
        env=stores.engine.env, capture_output=True, text=True, timeout=120)
    assert anon.returncode != 0, anon.stdout
    # ... and serves one that has it
    size = stores.compose("run", "--rm", "client", "nbdinfo", "--size",
                          "nbds://header-store/?tls-certificates=/pki/nbdluks")
    assert size.strip() == str(16 * MiB)
    # and never in the clear
    plain_try = subprocess.run(
        [*stores.command, "run", "--rm", "client", "nbdinfo", "--size",
         "nbd://header-store/"], env=stores.engine.env, capture_output=True, text=True,
        timeout=120)
    assert plain_try.returncode != 0
    assert os.path.exists(project / "pki" / "ca" / "ca-key.pem")
