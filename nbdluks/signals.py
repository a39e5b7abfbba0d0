"""Signals through the server's life.

From the first line of `main` until an event loop takes over, a stop signal
(SIGTERM, SIGINT) raises `Stopped`, so that a stop while unlocking or
binding ends the program at once -- also as PID 1 in a container, where a
signal without a handler is ignored. Just before an event loop starts, stop
signals only set a flag that the loop looks at once its own handlers are in
place (`defer`, `stop_requested`, `reload_requested`). SIGHUP asks for the
TLS certificates (and a configuration file) to be read again; one that comes
before there is a server to reload is noted and acted on once it serves.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

STOP = (signal.SIGTERM, signal.SIGINT)

_requested: int | None = None
_reload = False


class Stopped(KeyboardInterrupt):
    """A stop signal arrived before the server was serving. A subclass of
    KeyboardInterrupt so that it passes through event loops as ^C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _raise(signum: int, _frame: object) -> None:
    # Noted too: where Python swallows the exception (a signal that lands in
    # a weakref callback, such as the import system's, is only printed), the
    # server still sees the stop when it starts (stop_requested).
    global _requested
    _requested = signum
    raise Stopped(signum)


@contextmanager
def held_back() -> Iterator[None]:
    """Stop signals held back for a moment (a header written whole: it would
    be safe to stop anywhere, but a whole change is tidier); delivered after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """A Stopped that Python could not raise is noted (see _raise), not news."""
    if not isinstance(unraisable.exc_value, Stopped):
        sys.__unraisablehook__(unraisable)


def _note(signum: int, _frame: object) -> None:
    global _requested
    _requested = signum


def _note_hup(_signum: int, _frame: object) -> None:
    global _reload
    _reload = True


def _early_hup(_signum: int, _frame: object) -> None:
    global _reload
    _reload = True
    import structlog  # not before it is needed: this module loads first

    structlog.get_logger("nbdluks").info("SIGHUP noted: nothing to reload yet, "
                                         "reloading once serving")


def on_startup() -> None:
    sys.unraisablehook = _unraisable
    for sig in STOP:
        signal.signal(sig, _raise)
    signal.signal(signal.SIGHUP, _early_hup)


def defer() -> None:
    """From here on a stop signal is noted, for `stop_requested`, and SIGHUP
    for `reload_requested` (a server that starts must not miss either)."""
    for sig in STOP:
        signal.signal(sig, _note)
    signal.signal(signal.SIGHUP, _note_hup)


def stop_requested() -> bool:
    return _requested is not None


def requested() -> int | None:
    """The stop signal that came, if one did."""
    return _requested


def reload_requested() -> bool:
    return _reload
