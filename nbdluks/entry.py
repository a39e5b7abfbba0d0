"""The program's entry point: signal handlers before the heavy imports.

Importing the CLI (numpy, cryptography, uvloop) takes a while; a SIGTERM or
SIGHUP in that window would otherwise kill the process with the default
action, or be ignored by a PID 1."""

from __future__ import annotations

import sys


def main() -> int:
    from . import signals

    signals.on_startup()
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
