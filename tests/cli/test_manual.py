"""Man pages and bash completion come from the parser: every option is in
its page, the pages render, and completion knows the subcommands."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from nbdluks.cli import build_parser
from nbdluks.cli.manual import bash_completion, man_pages, write
from tests.conftest import need


def subparsers() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def plain(roff: str) -> str:
    return roff.replace("\\-", "-").replace("\\e", "\\")


@pytest.mark.parametrize("command", sorted(subparsers()))
def test_every_option_is_in_its_page(command: str) -> None:
    page = plain(man_pages()[f"nbdluks-{command}.1"])
    options = [o for a in subparsers()[command]._actions for o in a.option_strings]
    assert options
    for option in options:
        assert f"\\fB{option}\\fR" in page, f"{option} missing from nbdluks-{command}(1)"


def test_the_main_page_names_every_command() -> None:
    page = plain(man_pages()["nbdluks.1"])
    for command in subparsers():
        assert f"nbdluks-{command}\\fR(1)" in page


def test_pages_render_with_man(tmp_path: Path) -> None:
    need("man")
    for path in write(tmp_path):
        if path.suffix != ".1":
            continue
        out = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True,
                             env={"MANPAGER": "cat", "MANWIDTH": "80", "PATH": "/usr/bin:/bin"},
                             check=True)
        assert "NAME" in out.stdout and "SYNOPSIS" in out.stdout, path.name
        assert "warning" not in out.stderr, out.stderr


def complete(script: Path, *words: str) -> list[str]:
    """What bash's completion offers after `words` (the last is being typed)."""
    line = " ".join(f"'{w}'" for w in words)
    out = subprocess.run(
        ["bash", "-c", f'source "{script}"; COMP_WORDS=({line}); '
         f'COMP_CWORD={len(words) - 1}; _nbdluks; printf "%s\\n" "${{COMPREPLY[@]}}"'],
        capture_output=True, text=True, check=True, cwd=script.parent)
    return out.stdout.split()


def test_bash_completion(tmp_path: Path) -> None:
    script = tmp_path / "nbdluks"
    script.write_text(bash_completion())
    assert complete(script, "nbdluks", "se") == ["serve"]
    assert set(complete(script, "nbdluks", "")) >= {"serve", "inspect", "probe"}
    assert "--passphrase-file" in complete(script, "nbdluks", "serve", "--pass")
    assert complete(script, "nbdluks", "serve", "--tls", "") == ["off", "on", "require"]
    assert complete(script, "nbdluks", "inspect", "--js") == ["--json"]
    (tmp_path / "vol.hdr").touch()
    assert complete(script, "nbdluks", "serve", "--header", "vol.") == ["vol.hdr"]
