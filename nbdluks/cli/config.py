"""`serve --config FILE`: many exports in one TOML file.

One `[exports.NAME]` table per export, one `[server]` table; their keys are
the long option names of `serve` (what a user knows from the command line
carries over), checked against the parser's own actions: an unknown key, a
value of the wrong type or out of range is one line naming the file, the
table and the key (exit 2), before anything is unlocked. Options given on
the command line next to --config override `[server]`.
"""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass
from typing import Any

from ..unlock import VolumeConfig
from .options import UsageError, check_args, volume_config

# The options an export table takes; [server] takes the others but these.
EXPORT_KEYS = frozenset({
    "payload", "header", "raw", "passphrase-file", "key-file", "keyfile-offset",
    "keyfile-size", "volume-key-file", "key-slot", "token-only", "token-id", "token-type",
    "tang-timeout", "read-only", "description", "allow-discards", "upstream-timeout",
    "upstream-reconnect", "argon2-max-memory", "kdf-limit",
    "reencrypt", "reencrypt-rate", "resilience", "hotzone-size",
})
_NOT_IN_FILES = frozenset({"help", "config", "export-name"})


@dataclass(frozen=True)
class Config:
    path: str
    server: argparse.Namespace  # serve's arguments: defaults, [server], the command line
    exports: tuple[VolumeConfig, ...]


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long option name (without --) -> its action."""
    out = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                out[option[2:]] = action
    return out


def _value(action: argparse.Action, value: Any) -> Any:
    """`value` as the parser would have stored it; ValueError if it cannot be."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) for v in items):
            raise ValueError("must be a string or a list of strings")
        return items
    if action.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
    elif action.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        value = float(value)
    elif not isinstance(value, str):
        raise ValueError("must be a string")
    else:
        value = _converted(action, value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"must be one of {', '.join(map(str, action.choices))}")
    return value


def _converted(action: argparse.Action, value: str) -> Any:
    """A string as the option's own type makes it (e.g. a size: "4M")."""
    if action.type is None or action.type is str:
        return value
    try:
        return action.type(value)  # type: ignore[operator]
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _apply(ns: argparse.Namespace, table: dict[str, Any], allowed: frozenset[str],
           actions: dict[str, argparse.Action], where: str) -> None:
    for key, value in table.items():
        if key not in allowed or key not in actions:
            raise UsageError(f"{where} {key}: unknown key")
        try:
            setattr(ns, actions[key].dest, _value(actions[key], value))
        except ValueError as e:
            raise UsageError(f"{where} {key}: {e}") from None


def load(path: str, parser: argparse.ArgumentParser, given: argparse.Namespace) -> Config:
    """Read and check the file; `given`: the options the command line named."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise UsageError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: {e}") from None
    unknown = set(doc) - {"server", "exports"}
    if unknown:
        raise UsageError(f"{path}: unknown table [{sorted(unknown)[0]}]")
    actions = _actions(parser)
    for key in sorted(EXPORT_KEYS | {"export-name"}):
        if hasattr(given, actions[key].dest):
            raise UsageError(f"--{key}: with --config, each [exports.NAME] table gives it")
    server_keys = frozenset(actions) - EXPORT_KEYS - _NOT_IN_FILES
    base = parser.parse_args([])
    base.command = "serve"
    server_table = doc.get("server", {})
    exports = doc.get("exports", {})
    if not isinstance(server_table, dict) or not isinstance(exports, dict):
        raise UsageError(f"{path}: [server] and [exports.NAME] must be tables")
    _apply(base, server_table, server_keys, actions, f"{path}: [server]")
    for dest, value in vars(given).items():
        setattr(base, dest, value)
    try:
        check_args(base)
    except UsageError as e:
        raise UsageError(f"{path}: [server] {e}") from None
    volumes = []
    for name, table in exports.items():
        where = f"{path}: [exports.{name}]"
        if not isinstance(table, dict):
            raise UsageError(f"{where} must be a table")
        ns = parser.parse_args([])
        ns.command = "serve"
        _apply(ns, table, EXPORT_KEYS, actions, where)
        ns.export_name = name
        try:
            check_args(ns)
            volumes.append(volume_config(ns))
        except UsageError as e:
            raise UsageError(f"{where} {e}") from None
    return Config(path, base, tuple(volumes))
