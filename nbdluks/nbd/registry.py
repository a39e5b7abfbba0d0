"""Which connections a server process holds, and whom it lets in.

Each connection may hold requests in flight, so their number is capped. A
cap alone lets idle connections lock everybody else out: a flood of silent
TCP connections, or clients that negotiate and then sit there. So:

- Negotiating has its own budget (a quarter of the slots, at least 4) and a
  time limit (ServerOptions.handshake_timeout). When the budget is spent, the
  connection that has been negotiating longest is closed for the newcomer: a
  real client negotiates in milliseconds, a silent one never.
- When every slot is taken, the connection idle longest (no request in
  flight, none for IDLE_FLOOR seconds or more) is closed for the newcomer;
  if every connection is busy, the newcomer is refused.
"""

from __future__ import annotations

import time
from typing import Generic, Protocol, TypeVar

import structlog

log = structlog.get_logger("nbdluks.server")

# A served connection quieter than this is never closed to make room.
IDLE_FLOOR = 1.0


class Slot(Protocol):
    """What the registry needs of a connection."""

    opened: float  # time.monotonic() when accepted
    last_active: float  # ... when it last sent a request or got a reply

    @property
    def negotiating(self) -> bool: ...

    @property
    def busy(self) -> bool: ...

    def evict(self, reason: str) -> None: ...


S = TypeVar("S", bound=Slot)


class Registry(Generic[S]):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.negotiating_limit = min(limit, max(4, limit // 4))
        self.live: set[S] = set()

    def admit(self, conn: S) -> bool:
        negotiating = [c for c in self.live if c.negotiating]
        if len(negotiating) >= self.negotiating_limit:
            self._evict(min(negotiating, key=lambda c: c.opened),
                        "still negotiating while others wait")
        if len(self.live) >= self.limit:
            victim = self._idlest()
            if victim is None:
                return False
            self._evict(victim, "idle longest while every slot is taken")
        self.live.add(conn)
        return True

    def release(self, conn: S) -> None:
        self.live.discard(conn)

    def _idlest(self) -> S | None:
        now = time.monotonic()
        idle = [c for c in self.live
                if not c.negotiating and not c.busy and now - c.last_active >= IDLE_FLOOR]
        return min(idle, key=lambda c: c.last_active) if idle else None

    def _evict(self, conn: S, reason: str) -> None:
        self.live.discard(conn)
        conn.evict(reason)
