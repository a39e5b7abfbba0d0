"""The exports one server process serves, by name, and those still to come.

An export can be announced before it is ready (`expect`: its volume is
still being unlocked): a client that asks for it waits (`wait`) until it is
added, fails or goes away, and is then answered as if it had asked just
then. Exports are listed in the order the configuration gives (`rank`), not
in the order they became ready.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from .commands import Export
from .handshake import ExportInfo


class Exports(dict[str, Export]):
    def __init__(self, exports: Iterable[Export] = ()) -> None:
        super().__init__((e.name, e) for e in exports)
        self.pending: set[str] = set()  # announced, still being unlocked
        self.failed: set[str] = set()  # announced, could not be unlocked
        self.rank: dict[str, int] = {}  # where the configuration lists it
        self._waiters: dict[str, list[Callable[[], object]]] = {}

    def expect(self, names: Iterable[str]) -> None:
        """Exports that are coming: clients asking for them wait."""
        for name in names:
            self.pending.add(name)
            self.failed.discard(name)

    def order(self, names: Iterable[str]) -> None:
        self.rank = {name: i for i, name in enumerate(names)}

    def add(self, export: Export) -> Export | None:
        """Serve `export` (the one it replaces, if any, is returned)."""
        old = self.get(export.name)
        self[export.name] = export
        self._settle(export.name)
        return old

    def fail(self, name: str) -> Export | None:
        """It could not be unlocked: it is not served (the one served until
        now, if any, is returned)."""
        old = self.pop(name, None)
        self._settle(name, failed=True)
        return old

    def remove(self, name: str) -> Export | None:
        old = self.pop(name, None)
        self._settle(name)
        return old

    def wait(self, name: str, ready: Callable[[], object]) -> Callable[[], None]:
        """Call `ready()` once `name` is settled; the function returned
        forgets the waiter (its connection went away)."""
        waiters = self._waiters.setdefault(name, [])
        waiters.append(ready)

        def cancel() -> None:
            if ready in waiters:
                waiters.remove(ready)
        return cancel

    def _settle(self, name: str, failed: bool = False) -> None:
        self.pending.discard(name)
        if failed:
            self.failed.add(name)
        else:
            self.failed.discard(name)
        for ready in self._waiters.pop(name, []):
            ready()

    def infos(self) -> Mapping[str, ExportInfo]:
        """What negotiation tells clients, as the exports are now."""
        return _Infos(self)


class _Infos(Mapping[str, ExportInfo]):
    """A live view: each lookup sees the exports as they are at that moment."""

    def __init__(self, exports: Exports) -> None:
        self._exports = exports

    def __getitem__(self, name: str) -> ExportInfo:
        return self._exports[name].info()

    def __contains__(self, name: object) -> bool:
        return name in self._exports

    def __iter__(self) -> Iterator[str]:
        rank = self._exports.rank
        return iter(sorted(self._exports, key=lambda n: rank.get(n, len(rank))))

    def __len__(self) -> int:
        return len(self._exports)
