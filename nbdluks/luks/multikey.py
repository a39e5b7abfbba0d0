"""What every view of a volume through more than one key shares (a volume
in reencryption: SegmentedDevice, RotatingDevice): the keys kept to reopen
it in a worker or hand it to one, the read-modify-write lock its
LuksDevices share across processes, and the device's life."""

from __future__ import annotations

import errno
import pickle
from collections.abc import Callable
from typing import Any

from ..block import BlockDevice, RangeLock
from .device import LuksDevice
from .unlock import wipe
from .volume import Volume


class MultiKeyDevice(BlockDevice):
    payload: BlockDevice
    vol: Volume

    def _keep(self, payload: BlockDevice, vol: Volume, keys: dict[str, bytearray], *,
              read_only: bool, allow_discards: bool, attached: bool,
              rmw_lock: RangeLock | None) -> None:
        """Its own copy of the keys (digest id -> key), and the options."""
        self.payload, self.vol, self.read_only = payload, vol, read_only
        self.allow_discards, self.attached = allow_discards, attached
        self._keys: dict[str, bytearray] | None = {d: bytearray(k) for d, k in keys.items()}
        self._own_lock = rmw_lock is None
        self._rmw = rmw_lock if rmw_lock is not None else RangeLock()
        self.multi_open, self.has_upstream = payload.multi_open, payload.has_upstream

    def luks_devices(self) -> list[LuksDevice]:
        raise NotImplementedError

    def _shared(self) -> tuple[Any, ...]:
        """What a reopened or handed-over copy shares with this one, beside the keys."""
        return ()

    def _options(self) -> dict[str, Any]:
        return {"read_only": self.read_only, "allow_discards": self.allow_discards,
                "attached": self.attached, "rmw_lock": self._rmw}

    def _flush(self) -> None:
        self.payload.flush()

    def before_fork(self) -> None:
        self.payload.before_fork()

    def reopen(self) -> MultiKeyDevice:
        if self._keys is None:
            raise OSError(errno.EOPNOTSUPP, "sealed: the keys are forgotten")
        payload = self.payload.reopen()
        try:
            make: Any = type(self)  # each subclass takes (payload, vol, keys, *shared)
            dev: MultiKeyDevice = make(payload, self.vol, self._keys, *self._shared(),
                                       **self._options())
            return dev
        except BaseException:
            payload.close()
            raise

    def __reduce__(self) -> Any:
        """The arguments that rebuild it in a running worker (see block.Passed)."""
        if self._keys is None:
            raise TypeError("sealed: the keys are forgotten")
        return _passed, (type(self), self.payload, self.vol,
                         {d: pickle.PickleBuffer(k) for d, k in self._keys.items()},
                         self._shared(), self._options())

    def _forget(self) -> None:
        for dev in self.luks_devices():
            dev.forget_key()
        if self._keys is not None:
            for key in self._keys.values():
                wipe(key)
            self._keys = None

    def seal(self) -> None:
        self._forget()
        self.payload.seal()

    def watch(self, report: Callable[[bool], object]) -> None:
        self.payload.watch(report)

    def close(self) -> None:
        self._forget()
        if self._own_lock:
            self._rmw.close()
        self.payload.close()


def _passed(cls: type[MultiKeyDevice], payload: BlockDevice, vol: Volume,
            keys: dict[str, bytearray], shared: tuple[Any, ...], options: dict[str, Any]
            ) -> MultiKeyDevice:
    dev = cls(payload, vol, keys, *shared, **options)  # type: ignore[call-arg]
    dev._own_lock = True  # the lock handed over is this process's own object
    return dev
