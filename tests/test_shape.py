"""The code's shape, checked: module and function sizes, the direction of
imports between the layers, sans-IO protocol modules, and lower layers that
never name a command-line flag (the CLI adds that hint)."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from nbdluks.cli.main import build_parser

PACKAGE = Path(__file__).resolve().parent.parent / "nbdluks"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def imports(path: Path) -> set[str]:
    """Absolute names of the nbdluks modules `path` imports."""
    pkg = ["nbdluks", *path.relative_to(PACKAGE).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            out.add(".".join([*base, *(node.module or "").split(".")]).rstrip("."))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_modules_and_functions_stay_small(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{node.name}: {length} lines"


# layer -> what it must never import
FORBIDDEN = {
    "block": ("nbdluks.nbd", "nbdluks.luks", "nbdluks.unlock.opener", "nbdluks.cli.main"),
    "luks": ("nbdluks.nbd", "nbdluks.unlock.opener", "nbdluks.cli.main", "nbdluks.unlock.sources"),
    "nbd": ("nbdluks.luks", "nbdluks.unlock.opener", "nbdluks.cli.main", "nbdluks.unlock.sources"),
}
# The protocol codec and rules do no I/O (h11 style).
SANS_IO = ("nbd/wire.py", "nbd/handshake.py", "nbd/commands.py", "nbd/constants.py")


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_layers_import_one_way(path: Path) -> None:
    layer = path.relative_to(PACKAGE).parts[0]
    names = imports(path)
    for forbidden in FORBIDDEN.get(layer, ()):
        assert not any(n == forbidden or n.startswith(forbidden + ".") for n in names), (
            f"{rel(path)} imports {forbidden}")
    if str(path.relative_to(PACKAGE)) in SANS_IO:
        assert not names & {"asyncio", "socket", "ssl", "threading", "os", "selectors"}


def flags() -> set[str]:
    out: set[str] = set()
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out.update(o for a in sub._actions for o in a.option_strings
                           if o.startswith("--"))
    return out


CLI = PACKAGE / "cli"  # the only package whose modules may name a flag


@pytest.mark.parametrize("path", [m for m in MODULES if not m.is_relative_to(CLI)], ids=rel)
def test_lower_layers_never_name_a_flag(path: Path) -> None:
    known = flags()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = [f for f in known if f in node.value]
            assert not named, f"{rel(path)} names {named}: {node.value!r}"
