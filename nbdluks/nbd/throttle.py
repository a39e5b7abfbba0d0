"""At most one log line per kind of event per interval: a dead upstream
fails every request, and a line for each would flood the log."""

from __future__ import annotations

import time
from collections.abc import Hashable


class Throttle:
    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._state: dict[Hashable, tuple[float, int]] = {}

    def admit(self, key: Hashable) -> int | None:
        """None: hold this one back. Else log it, saying how many of its kind
        were held back since the last one."""
        now = time.monotonic()
        last, held = self._state.get(key, (-self.interval, 0))
        if now - last >= self.interval:
            self._state[key] = (now, 0)
            return held
        self._state[key] = (last, held + 1)
        return None
