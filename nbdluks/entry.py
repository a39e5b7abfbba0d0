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
    except signals.Stopped as e:
        # A stop while importing or parsing, before anything was opened.
        return _stopped(e.signum)
    except Exception:
        signum = signals.requested()
        if signum is not None:
            # The stop surfaced as another error: C code (numpy's import of
            # its extensions) turns the exception a handler raises into its own.
            return _stopped(signum)
        raise


def _stopped(signum: int) -> int:
    """Exit 0, as a stop before serving does (serve's help says so); a
    command that changes a volume and was cut short fails (128 + signal)."""
    words = [a for a in sys.argv[1:] if not a.startswith("-")]
    return 0 if not words or words[0] in _STOP_IS_CLEAN else 128 + signum


_STOP_IS_CLEAN = ("serve", "probe", "inspect")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
