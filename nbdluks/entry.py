"""The program's entry point: signal handlers before the heavy imports.

Importing the CLI (numpy, cryptography, uvloop) takes a while; a SIGTERM or
SIGHUP in that window would otherwise kill the process with the default
action, or be ignored by a PID 1."""

from __future__ import annotations

import sys


def main() -> int:
    from . import signals

    signals.on_startup()
    try:
        from .cli import main as cli_main

        return cli_main()
    except signals.Stopped:
        # A stop while importing or parsing, before anything was opened:
        # exit 0, as a stop before serving does (and `serve --help` says).
        return 0
    except Exception:
        if signals.requested() is not None:
            # The stop surfaced as another error: C code (numpy's import of
            # its extensions) turns the exception a handler raises into its own.
            return 0
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
