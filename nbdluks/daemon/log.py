"""Logging setup: structlog, console on a terminal, JSON otherwise.

Tracebacks are rendered without local variables: a frame's locals may hold
a passphrase or a volume key. Each line goes out in one write(2), so that
lines of several worker processes sharing stderr never interleave.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_format = "console"


class LineLogger:
    """Writes each rendered line to stderr with a single write(2)."""

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "replace")
        while data:
            try:
                n = os.write(2, data)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone: nothing to tell
            data = data[n:]

    debug = info = warning = warn = error = err = critical = fatal = exception = msg


def setup(fmt: str = "auto", level: str = "info") -> None:
    global _format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    _format = fmt
    renderer: Any
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer()
    else:
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(),
            exception_formatter=structlog.dev.plain_traceback,
        )
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level.upper())
        ),
        logger_factory=lambda *_args: LineLogger(),
        cache_logger_on_first_use=False,
    )


def fatal(message: str, status: int) -> None:
    """The one line a program that cannot go on leaves: plain on a console,
    a JSON record when the logs are JSON."""
    if _format == "json":
        structlog.get_logger("nbdluks").error("fatal error", error=message, exit_status=status)
    else:
        LineLogger().msg(f"nbdluks: {message}")
