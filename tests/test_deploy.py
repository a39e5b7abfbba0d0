"""The container files cannot be run here (no Docker engine): check what can
be checked: they parse, the paths they copy exist, and the command lines
they give are valid for nbdluks' own argument parser."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nbdluks.cli.main import build_parser
from tests.conftest import free_port, need, run, wait_listening
from tests.luks.reference import luks_format

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_existing_paths_and_runs_the_cli() -> None:
    ins = dockerfile_instructions()
    assert ins[0][0] == "FROM"
    assert next(r for w, r in ins if w == "FROM").endswith(" AS builder")  # multi-stage
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from="):
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
    pins = (ROOT / "deploy" / "constraints.txt").read_text().splitlines()
    assert any(p.startswith("cryptography==") for p in pins)
    health = dict(ins)["HEALTHCHECK"]
    assert json.loads(health.split("CMD", 1)[1])[:2] == ["nbdluks", "probe"]
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    assert entry == ["nbdluks"]
    cmd = json.loads(dict(ins)["CMD"])
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.passphrase_file.startswith("/run/secrets/")
    assert ("USER", "10809:10809") in ins


def test_compose_file_is_valid_and_uses_a_secret_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["nbdluks"]
    args = build_parser().parse_args(svc["command"])
    assert args.command == "serve"
    assert args.passphrase_file == "/run/secrets/luks_passphrase"
    assert "luks_passphrase" in svc["secrets"]
    assert "luks_passphrase" in compose["secrets"]
    assert not any("PASS" in str(e).upper() for e in svc.get("environment", []))
    assert (ROOT / svc["build"]).is_dir()
    assert "--user" in svc["command"] and svc["cap_drop"] == ["ALL"]
    assert all(p.startswith("127.0.0.1:") for p in svc["ports"])


@pytest.mark.parametrize("name", ["stores.yml", "tang.yml", "many.yml"])
def test_other_compose_stacks_run_valid_commands(name: str) -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose" / name).read_text())
    args = build_parser().parse_args(compose["services"]["nbdluks"]["command"])
    assert args.command == "serve" and args.user == "nbdluks"
    if name == "tang.yml":  # no secret at all
        assert not args.passphrase_file and "secrets" not in compose
    if name == "many.yml":  # the exports from a file, which SIGHUP reloads
        assert args.config == "/data/exports.toml" and not args.payload


def test_many_volumes_unit_reloads_its_configuration() -> None:
    u = unit("nbdluks-many.service")
    assert u["Type"] == ["notify"] and u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    args = build_parser().parse_args(u["ExecStart"][0].split()[1:])
    assert args.config == "/etc/nbdluks/exports.toml" and not args.payload


def unit(name: str) -> dict[str, list[str]]:
    """The settings of a systemd unit file (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / name).read_text().replace("\\\n", " ").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(" ".join(value.split()))
    return out


@pytest.mark.parametrize("name", ["nbdluks.service", "nbdluks@.service"])
def test_systemd_units_parse_and_take_the_passphrase_as_a_credential(name: str) -> None:
    u = unit(name)
    assert u["Type"] == ["notify"] and u["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert u["LoadCredential"][0].startswith("passphrase:")
    words = u["ExecStart"][0].split()[1:]
    args = build_parser().parse_args([w for w in words if w != "$OPTIONS"])
    assert args.command == "serve"
    assert args.passphrase_file == "${CREDENTIALS_DIRECTORY}/passphrase"
    assert not (args.bind or args.port or args.socket)  # the socket unit may pass one


def test_socket_unit_and_service_work_together_as_shipped(tmp_path: Path) -> None:
    """Run the service's ExecStart as systemd would behind nbdluks.socket:
    systemd-socket-activate passes the listener, the credential directory
    holds the passphrase, NOTIFY_SOCKET gets READY=1."""
    need("systemd-socket-activate", "cryptsetup", "nbdinfo")
    made = luks_format(tmp_path, detached=True, size=1 << 20)
    assert made.header
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "passphrase").write_bytes(made.passphrase + b"\n")
    service, socket_unit = unit("nbdluks.service"), unit("nbdluks.socket")
    port = free_port()
    listen = socket_unit["ListenStream"][0].replace(":10809", f":{port}")
    exec_start = (service["ExecStart"][0]
                  .replace("/usr/local/bin/nbdluks", f"{sys.executable} -m nbdluks")
                  .replace("/srv/nbdluks/payload.img", str(made.payload))
                  .replace("/srv/nbdluks/header.img", str(made.header))
                  .replace("${CREDENTIALS_DIRECTORY}", str(creds)))
    notify = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(notify))
        systemd.settimeout(60)
        log = open(tmp_path / "log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(["systemd-socket-activate", "-l", listen,
                                 "-E", f"NOTIFY_SOCKET={notify}", *exec_start.split()],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_listening(proc, None, port, tmp_path / "log")
            # the first connection starts the service; it is served once unlocked
            uri = f"nbd://127.0.0.1:{port}/"
            assert run(["nbdinfo", "--size", uri], timeout=60).stdout.strip() == str(1 << 20)
            assert "READY=1" in systemd.recv(4096).decode().splitlines()
            proc.send_signal(signal.SIGTERM)
            assert systemd.recv(4096) == b"STOPPING=1"
            assert proc.wait(30) == 0
        finally:
            log.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("script", ["scripts/test", "scripts/serve-demo", "scripts/setup",
                                    ".ci/run"])
def test_scripts_are_executable(script: str) -> None:
    p = ROOT / script
    assert p.exists() and p.stat().st_mode & 0o111
