"""A Docker engine for the container tests, started the way these machines
allow (../shared/CONTAINERS.md): dockerd by hand with its state under
/var/tmp (kept between runs, so images are cached), and base images built
locally with debootstrap since no registry can be reached."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

STATE = Path(os.environ.get("NBDLUKS_DOCKER_STATE", "/var/tmp/nbdluks-docker"))
MIRROR = "http://deb.debian.org/debian"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")

# Stand-ins for the images the Dockerfiles name, by tag: the packages each needs.
BASES = {
    "python:3.11-slim-bookworm": "python3,python3-pip,python3-venv,ca-certificates,"
                                 "python-is-python3",
    "debian:bookworm-slim": "ca-certificates",
}


class EngineUnavailable(Exception):
    pass


class Engine:
    def __init__(self, state: Path = STATE) -> None:
        self.state = state
        self.sock = state / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}",
                    "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}
        self.started = False

    def run(self, *cmd: str, check: bool = True, timeout: float = 600,
            cwd: Path | None = None, input: bytes | None = None
            ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True,
                           timeout=timeout, input=input.decode() if input else None, text=True,
                           errors="replace")
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p

    def docker(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("docker", *args, **kw)  # type: ignore[arg-type]

    def alive(self) -> bool:
        return self.run("docker", "info", check=False, timeout=30).returncode == 0

    def start(self) -> None:
        for tool in ("dockerd", "docker", "docker-compose", "debootstrap"):
            if not shutil.which(tool):
                raise EngineUnavailable(f"{tool} is not installed")
        if os.geteuid() != 0:
            raise EngineUnavailable("the Docker engine needs root")
        self.state.mkdir(parents=True, exist_ok=True)
        if self.alive():
            return
        log = open(self.state / "dockerd.log", "ab")  # noqa: SIM115 (dockerd keeps it)
        subprocess.Popen(
            ["dockerd", "--data-root", str(self.state / "data"), "--exec-root",
             str(self.state / "exec"), "--pidfile", str(self.state / "dockerd.pid"),
             "-H", f"unix://{self.sock}"], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.alive():
            if time.monotonic() > deadline:
                raise AssertionError("dockerd did not start:\n"
                                     + (self.state / "dockerd.log").read_text()[-3000:])
            time.sleep(0.3)
        self.started = True

    def stop(self) -> None:
        """Stop the engine if this run started it (its images stay cached)."""
        if not self.started:
            return
        pid = int((self.state / "dockerd.pid").read_text())
        os.kill(pid, 15)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)

    def has_image(self, tag: str) -> bool:
        return self.run("docker", "image", "inspect", tag, check=False).returncode == 0

    def ensure_base(self, tag: str) -> None:
        """A stand-in for a registry image: debootstrap, then docker import."""
        if self.has_image(tag):
            return
        with tempfile.TemporaryDirectory(dir=self.state) as tmp:
            root = Path(tmp) / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASES[tag]}",
                            "bookworm", str(root), MIRROR], check=True, capture_output=True,
                           timeout=900)
            for f in root.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                f.unlink()
            # The registries are reached through a proxy whose CA the host trusts:
            # only this stand-in learns it, never the project's Dockerfiles.
            if HOST_CA.exists():
                shutil.copyfile(HOST_CA, root / "etc/ssl/certs/ca-certificates.crt")
                (root / "etc/pip.conf").write_text(f"[global]\ncert = {HOST_CA}\n")
            for deb in (root / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            for lists in (root / "var/lib/apt/lists").glob("*_*"):
                lists.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, env=self.env,
                           check=True, capture_output=True, timeout=300)
            tar.wait()
