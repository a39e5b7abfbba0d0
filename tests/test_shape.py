"""The code's shape, checked: module and function sizes, the direction of
imports between the layers, sans-IO protocol modules, and lower layers that
never name a command-line flag (the CLI adds that hint)."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

from nbdluks.cli import build_parser

PACKAGE = Path(__file__).resolve().parent.parent / "nbdluks"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def rel(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (`from . import x`: the
    package's x)."""
    pkg = ["nbdluks", *path.relative_to(PACKAGE).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            if node.module is None:
                out.update(".".join([*base, a.name]) for a in node.names)
            else:
                out.add(".".join([*base, *node.module.split(".")]))
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


# package -> the packages it may import, each only through its face (its
# __init__); top-level modules (errors, signals, native, the version) are open to all.
ALLOWED = {
    "block": set(),
    "luks": {"block"},
    "nbd": {"block"},
    "unlock": {"block", "luks", "nbd"},
    "daemon": {"block", "nbd", "unlock"},
    "manage": {"block", "luks", "nbd", "unlock"},
    "cli": {"block", "luks", "nbd", "unlock", "daemon", "manage"},
}
TOP = {"nbdluks.__version__", "nbdluks.errors", "nbdluks.native", "nbdluks.signals"}
# The protocol codec and rules do no I/O (h11 style).
SANS_IO = ("nbd/wire.py", "nbd/handshake.py", "nbd/commands.py", "nbd/constants.py")


def test_every_package_is_known() -> None:
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(ALLOWED)
    assert len(list(PACKAGE.glob("*.py"))) <= 8  # the rest lives in packages by role


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_layers_import_one_way_through_faces(path: Path) -> None:
    parts = path.relative_to(PACKAGE).parts
    own = parts[0] if len(parts) > 1 else None
    for name in imports(path):
        if not name.startswith("nbdluks") or name in TOP:
            continue
        pkg = name.split(".")[1]
        if pkg == own:
            assert name != f"nbdluks.{own}", f"{rel(path)} imports its own package's face"
            continue
        if own is None:  # entry.py, __main__.py
            assert name in ("nbdluks.cli", "nbdluks.entry"), f"{rel(path)} imports {name}"
            continue
        assert pkg in ALLOWED[own], f"{rel(path)} imports {name}"
        assert name == f"nbdluks.{pkg}", f"{rel(path)} imports {name}, not its face"
    if str(path.relative_to(PACKAGE)) in SANS_IO:
        assert not imports(path) & {"asyncio", "socket", "ssl", "threading", "os", "selectors"}


@pytest.mark.parametrize("face", sorted(ALLOWED))
def test_faces_export_what_they_import(face: str) -> None:
    module = importlib.import_module(f"nbdluks.{face}")
    assert all(hasattr(module, n) for n in module.__all__)


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


def test_readme_layout_names_every_module() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout") :].split("\n## ", 1)[0]
    for path in [*MODULES, *PACKAGE.rglob("*.c")]:
        if path.name != "__init__.py":
            assert f"`{path.name}`" in layout, f"README's Layout does not name {rel(path)}"
    for package in PACKAGE.rglob("__init__.py"):
        if package.parent != PACKAGE:
            assert f"{package.parent.name}/`" in layout, f"Layout misses {rel(package.parent)}"
