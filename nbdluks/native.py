"""The optional C helpers (luks/_xtsloop.c, nbd/_transmit.c): loaded when
they are built, unless NBDLUKS_NATIVE=0 turns them off. Without them the
pure-Python path serves, the reference for every rule; the tests run both
ways (.ci/run)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

ENABLED = os.environ.get("NBDLUKS_NATIVE", "1") != "0"


def load(name: str) -> ModuleType | None:
    """The helper module `name`, or None (not built, or turned off)."""
    if not ENABLED:
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
