"""What users install: the sdist and wheel that `python -m build` makes,
installed into a fresh virtualenv outside the checkout (and with pipx),
serve a file that nbdinfo reads; the man pages and completion come along."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import need, wait_listening

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it (the build runs in this
    interpreter's environment, which has the build requirements)."""
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "nbdluks"
    # A clean copy of the tree: no build/ or .venv/ of the checkout's own
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "demo", "*.egg-info", "__pycache__", "*.so",
        ".hypothesis", ".*_cache"))
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out),
                    str(src)], check=True, capture_output=True, text=True)
    return out


def only(d: Path, pattern: str) -> Path:
    (found,) = d.glob(pattern)
    return found


def test_sdist_holds_the_sources(dist: Path) -> None:
    with tarfile.open(only(dist, "nbdluks-*.tar.gz")) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for path in ("setup.py", "pyproject.toml", "README.md", "nbdluks/luks/_xtsloop.c",
                 "nbdluks/nbd/_transmit.c", "nbdluks/_c/evpxts.h", "nbdluks/cli/manual.py",
                 "nbdluks/unlock/clevis/tang.py"):
        assert path in names


def test_wheel_carries_pages_and_completion(dist: Path) -> None:
    with zipfile.ZipFile(only(dist, "nbdluks-*.whl")) as z:
        names = z.namelist()
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    commands = ["serve", "inspect", "probe", "format", "add-key", "change-key", "remove-key",
                "kill-slot", "bind", "unbind", "header-backup", "header-restore", "reencrypt"]
    assert sorted(data) == sorted([
        "share/man/man1/nbdluks.1", *(f"share/man/man1/nbdluks-{c}.1" for c in commands),
        "share/bash-completion/completions/nbdluks"])
    for helper in ("nbdluks/luks/_xtsloop", "nbdluks/nbd/_transmit"):
        assert any(n.startswith(helper) and n.endswith(".so") for n in names)


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv outside the checkout with the wheel installed."""
    env = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin/pip"), "install", "-q", str(only(dist, "nbdluks-*.whl"))],
                   check=True, capture_output=True, text=True, cwd=env)
    return env


def test_installed_wheel_serves_and_documents(venv: Path, tmp_path: Path) -> None:
    need("nbdinfo", "man")
    exe = venv / "bin/nbdluks"
    clean = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                             check=True, env=clean, cwd=tmp_path).stdout
    assert version.startswith("nbdluks ") and "C helper built" in version
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    sock = tmp_path / "s.sock"
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(exe), "serve", "--raw", str(disk), "-k", str(sock)],
                                stdout=f, stderr=subprocess.STDOUT, env=clean, cwd=tmp_path)
    try:
        wait_listening(proc, str(sock), None, log)
        info = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                              capture_output=True, text=True, check=True).stdout
        assert int(info) == 1 << 20
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    # man finds the pages next to the venv's bin/ on PATH (man-db's manpath)
    page = subprocess.run(["man", "nbdluks-serve"], capture_output=True, text=True, check=True,
                          env={**clean, "MANPAGER": "cat", "MANWIDTH": "80"}).stdout
    assert "--passphrase-file" in page.replace("\u2010", "-")
    completion = venv / "share/bash-completion/completions/nbdluks"
    out = subprocess.run(["bash", "-c", f'source "{completion}"; COMP_WORDS=(nbdluks se); '
                          'COMP_CWORD=1; _nbdluks; echo "${COMPREPLY[@]}"'],
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["serve"]


def test_pipx_installs_the_wheel(dist: Path, tmp_path: Path) -> None:
    need("pipx")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "PIP_CACHE_DIR": os.path.expanduser("~/.cache/pip"),  # the dependencies, once
           "PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin")}
    subprocess.run(["pipx", "install", str(only(dist, "nbdluks-*.whl"))], check=True,
                   capture_output=True, text=True, env=env)
    out = subprocess.run([str(tmp_path / "bin/nbdluks"), "--version"], check=True,
                         capture_output=True, text=True, env=env).stdout
    assert out.startswith("nbdluks ")
