"""Admission when slots run out, driven directly: silent negotiators and
idle clients make room, busy ones never do."""

from __future__ import annotations

import time

from nbdluks.nbd.registry import IDLE_FLOOR, Registry


class Conn:
    def __init__(self, negotiating: bool = False, busy: bool = False, idle: float = 0.0,
                 age: float = 0.0) -> None:
        now = time.monotonic()
        self.opened = now - age
        self.last_active = now - idle
        self.negotiating = negotiating
        self.busy = busy
        self.evicted: str | None = None

    def evict(self, reason: str) -> None:
        self.evicted = reason


def test_negotiation_has_its_own_budget_and_the_oldest_makes_room() -> None:
    reg: Registry[Conn] = Registry(16)
    assert reg.negotiating_limit == 4
    silent = [Conn(negotiating=True, age=10 - i) for i in range(4)]
    for c in silent:
        assert reg.admit(c)
    newcomer = Conn(negotiating=True)
    assert reg.admit(newcomer)
    assert silent[0].evicted and not any(c.evicted for c in silent[1:])
    assert newcomer in reg.live and silent[0] not in reg.live


def test_full_slots_close_the_idlest_and_never_a_busy_one() -> None:
    reg: Registry[Conn] = Registry(4)
    busy = [Conn(busy=True, idle=100) for _ in range(2)]
    idle = [Conn(idle=IDLE_FLOOR + 5), Conn(idle=IDLE_FLOOR + 50)]
    for c in busy + idle:
        assert reg.admit(c)
    assert reg.admit(Conn(negotiating=True))
    assert idle[1].evicted and not idle[0].evicted and not any(c.evicted for c in busy)
    # only busy or recently active connections left: the newcomer is refused
    reg2: Registry[Conn] = Registry(2)
    for c in (Conn(busy=True, idle=100), Conn(idle=IDLE_FLOOR / 10)):
        assert reg2.admit(c)
    assert not reg2.admit(Conn(negotiating=True))
