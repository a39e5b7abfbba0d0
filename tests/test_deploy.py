"""The container files cannot be run here (no Docker engine): check what can
be checked: they parse, the paths they copy exist, and the command lines
they give are valid for nbdluks' own argument parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from nbdluks.cli import build_parser

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
    for word, rest in ins:
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    assert entry == ["nbdluks"]
    cmd = json.loads(dict(ins)["CMD"])
    args = build_parser().parse_args(cmd)
    assert args.command == "serve" and args.passphrase_file.startswith("/run/secrets/")
    assert any(w == "USER" and r != "root" for w, r in ins)


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


def test_systemd_unit_command_parses() -> None:
    unit = (ROOT / "deploy" / "nbdluks.service").read_text().replace("\\\n", " ")
    m = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert m
    args = build_parser().parse_args(m.group(2).split())
    assert args.command == "serve" and args.passphrase_file


def test_socket_unit_listens_on_the_service_port() -> None:
    sock = (ROOT / "deploy" / "nbdluks.socket").read_text()
    m = re.search(r"^ListenStream=(.+)$", sock, re.M)
    unit = (ROOT / "deploy" / "nbdluks.service").read_text()
    port = re.search(r"--port (\d+)", unit)
    assert m and port and m.group(1).endswith(":" + port.group(1))


@pytest.mark.parametrize("script", ["scripts/test", "scripts/serve-demo", "scripts/setup",
                                    ".ci/run"])
def test_scripts_are_executable(script: str) -> None:
    p = ROOT / script
    assert p.exists() and p.stat().st_mode & 0o111
