"""A volume ready to serve: one object per export, many per process.

It holds what `serve` keeps per volume: its configuration (export name,
description, sources, how to unlock), the header copy it was unlocked
through, and the device template from which each worker process gets its own
device (the template keeps the volume key until it is sealed). Opening
happens before the volume is served, so that a wrong key or an unusable
source is one line, not a client's I/O error.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from ..block import BlockDevice
from ..luks import Argon2, Unlocked, Volume, open_device
from ..nbd import UpstreamOptions
from .headers import HeaderCopy, read_copies, read_copy
from .keys import UnlockOptions, unlock
from .sources import SourceError, open_source

log = structlog.get_logger("nbdluks.open")


@dataclass(frozen=True)
class VolumeOptions:
    """How the served device is opened."""

    read_only: bool = False
    allow_discards: bool = False
    upstream: UpstreamOptions = field(default_factory=UpstreamOptions)
    reencrypting: bool = False  # its reencryption is moved on while it is served


@dataclass(frozen=True)
class RotateSettings:
    """An export whose volume key is rotated while it is served (its
    reencryption moved on beside the server)."""

    rate: float | None = None  # bytes per second at most; None: no limit
    resilience: str = "checksum"
    hotzone_size: int = 4 << 20  # bytes per step, at most


@dataclass(frozen=True)
class VolumeConfig:
    """What a volume is made of and how it is exported: either `raw` (served
    as it is) or `payload` with its header copies (none: the payload's own)."""

    name: str = ""
    description: str = ""
    payload: str | None = None
    headers: tuple[str, ...] = ()
    raw: str | None = None
    keys: UnlockOptions = field(default_factory=UnlockOptions)
    options: VolumeOptions = field(default_factory=VolumeOptions)
    rotate: RotateSettings | None = None

    @property
    def source(self) -> str:
        spec = self.raw or self.payload
        assert spec is not None
        return spec


class OpenVolume:
    """A volume opened (and unlocked) and checked.

    In one process, `device()` hands over the template itself; with worker
    processes, the parent calls `before_fork()` and each worker's `device()`
    reopens the template. Either way the device handed out is sealed: only
    the parent's template keeps the key, to replace a worker that dies."""

    def __init__(self, config: VolumeConfig, template: BlockDevice,
                 header: Volume | None = None, keyslot: int | None = None,
                 unlock_seconds: float | None = None) -> None:
        self.config = config
        self.header = header  # the header copy unlocked through (None: raw)
        self.keyslot = keyslot
        self.unlock_seconds = unlock_seconds
        self._template: BlockDevice | None = template
        self._forked = False
        self.size = template.size
        self.multi_process = template.multi_open
        self._fields = self._describe(template)
        self.lock_fd: int | None = None  # cryptsetup's reencryption lock, held shared
        boundary = getattr(template, "boundary", None)  # a key rotated while served
        self.boundary: Any = boundary  # shared with its reencryption (and a next version)
        self.rotation: Callable[[], tuple[int, int]] | None = None if boundary is None else (
            lambda size=template.size: (boundary.moved(), size))
        self.lock_pid = os.getpid()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def role(self) -> str:
        """What the source is, in metrics and logs."""
        return "raw" if self.header is None else "payload"

    @property
    def watched_upstream(self) -> str | None:
        """The role of the source when an upstream connection is watched."""
        t = self._template
        return self.role if t is not None and t.has_upstream else None

    def __reduce__(self) -> Any:
        """Pickled to be handed to a running worker (daemon.handover): it
        gets the template itself, and serves it sealed."""
        if self._template is None:
            raise TypeError("the volume is closed")
        return OpenVolume, (self.config, self._template, self.header, self.keyslot,
                            self.unlock_seconds)

    def before_fork(self) -> None:
        assert self._template is not None
        self._template.before_fork()
        self._forked = True

    @property
    def template(self) -> BlockDevice | None:
        """The device workers reopen (None once handed over or closed)."""
        return self._template

    def device(self) -> BlockDevice:
        """The device this process serves, keeping nothing for reopening."""
        template = self._template
        assert template is not None, "the volume is closed"
        if self._forked:
            dev = template.reopen()
            template.seal()  # this process's copy of the parent's key
        else:
            dev, self._template = template, None
        dev.seal()
        return dev

    def log_fields(self) -> dict[str, Any]:
        return self._fields

    def _describe(self, template: BlockDevice) -> dict[str, Any]:
        vol = self.header
        if vol is None:
            return {"source": self.config.source}
        return {
            "luks_version": vol.version, "uuid": vol.uuid, "cipher": vol.segment.cipher,
            "sector_size": vol.segment.sector_size, "keyslot": self.keyslot, "size": self.size,
            "header_copy": vol.copy, **template.describe(),
            "unlock_seconds": None if self.unlock_seconds is None
            else round(self.unlock_seconds, 3),
        }

    def close(self) -> None:
        """Close the template (forgetting the key) once no worker needs it."""
        if self._template is not None:
            self._template.close()
            self._template = None
        if self.lock_fd is not None:
            if os.getpid() == self.lock_pid:  # the process that took it
                release_lock(self.lock_fd, self.header.uuid if self.header else "")
            else:  # a worker's copy: the parent still holds the lock
                os.close(self.lock_fd)
            self.lock_fd = None


class MemoryGate:
    """Unlocks that run at once take at most `cap_kib` KiB of Argon2 memory
    together (one that needs more than the cap runs alone)."""

    def __init__(self, cap_kib: int) -> None:
        self.cap = max(1, cap_kib)
        self.used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, kib: int) -> Iterator[None]:
        kib = min(kib, self.cap)
        with self._cond:
            self._cond.wait_for(lambda: self.used + kib <= self.cap)
            self.used += kib
        try:
            yield
        finally:
            with self._cond:
                self.used -= kib
                self._cond.notify_all()


def half_the_memory_kib() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2048


def open_volume(config: VolumeConfig, gate: MemoryGate | None = None, **shared: Any
                ) -> OpenVolume:
    """Open the sources, unlock through the first header copy that opens,
    and stack the LUKS layer over the payload. `gate`: shared by unlocks
    that run at once, for the memory their KDFs take; `shared`: what the
    device shares with an earlier one (a rotating volume's boundary)."""
    opts = config.options
    if config.raw is not None:
        dev = open_source(config.raw, read_only=opts.read_only, upstream=opts.upstream)
        return OpenVolume(config, dev)
    assert config.payload is not None
    copy, unlocked, took = _unlock(config, gate)
    assert copy.vol is not None
    lock = None
    try:
        if copy.vol.version == 2:  # no cryptsetup reencryption starts under us
            lock = reencryption_lock(copy.vol.uuid, quiet=copy.vol.reencryption is None)
            _unchanged(copy, config)  # what was unlocked is what the lock now guards
        payload = open_source(config.payload, read_only=opts.read_only, upstream=opts.upstream)
        try:
            dev = open_device(payload, copy.vol, unlocked.key, unlocked.keys,
                              rotating=opts.reencrypting,
                              read_only=opts.read_only, allow_discards=opts.allow_discards,
                              attached=_same_source(copy.source, config.payload), **shared)
        except BaseException:
            payload.close()
            raise
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    finally:
        unlocked.wipe()  # the device has its own copy
    opened = OpenVolume(config, dev, copy.vol, unlocked.keyslot, took)
    opened.lock_fd = lock
    return opened


def _unchanged(copy: HeaderCopy, config: VolumeConfig) -> None:
    """The header read again once the reencryption lock is held: a
    cryptsetup that moved the reencryption on (or finished it) between our
    read and our lock leaves another segment layout, which must not be served."""
    assert copy.vol is not None
    again = read_copy(copy.source, config.keys.argon2_max_kib, config.options.upstream)
    again.close()
    if again.vol is None or (again.vol.seqid, again.vol.json) != (copy.vol.seqid,
                                                                 copy.vol.json):
        raise SourceError(f"the header of {copy.source} changed while the volume was being "
                          "opened (cryptsetup reencrypting it?): start again")


REENCRYPTION_LOCK = "/run/cryptsetup/LN_LUKS2-reencryption-{uuid}"


def reencryption_lock(uuid: str, *, exclusive: bool = False, quiet: bool = False
                      ) -> int | None:
    """cryptsetup's reencryption lock, held shared while the volume is served:
    a `cryptsetup reencrypt` (which takes it exclusively) cannot start, and
    one running refuses us; `exclusive` while we reencrypt. None where the
    lock directory cannot be made (`quiet`: not worth a warning, no
    reencryption is in progress)."""
    path = REENCRYPTION_LOCK.format(uuid=uuid)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        (log.debug if quiet else log.warning)("cryptsetup's reencryption lock not taken",
                                              path=path, error=e.strerror)
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SourceError("the volume is being reencrypted or served by another process "
                          f"(it holds the reencryption lock {path})" if exclusive else
                          "cryptsetup is reencrypting this volume now (it holds the "
                          f"reencryption lock {path}): it cannot be served meanwhile") from None
    return fd


def release_lock(fd: int, uuid: str) -> None:
    """Let the lock go; its file goes too when nobody else holds it (as
    cryptsetup removes its lock files)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(REENCRYPTION_LOCK.format(uuid=uuid))
    except OSError:
        pass  # held by another process (or gone): it stays theirs
    finally:
        os.close(fd)


def _unlock(config: VolumeConfig, gate: MemoryGate | None
            ) -> tuple[HeaderCopy, Unlocked, float]:
    """Read the header copies and unlock through the first that opens."""
    assert config.payload is not None
    headers: Sequence[str] = config.headers or (config.payload,)
    keys = config.keys
    copies = read_copies(headers, keys.argon2_max_kib, config.options.upstream)
    try:
        for copy in copies:
            assert copy.vol is not None
            for w in copy.vol.warnings:
                log.warning(w, source=copy.source)
        with gate.hold(_argon2_kib(copies, keys)) if gate else contextlib.nullcontext():
            started = time.monotonic()
            copy, unlocked = unlock(copies, keys)
            took = time.monotonic() - started
    finally:
        for c in copies:
            c.close()
    if len(copies) > 1 or len(headers) > 1:
        log.info("header copy in use", source=copy.source)
    return copy, unlocked, took


def _argon2_kib(copies: Sequence[HeaderCopy], keys: UnlockOptions) -> int:
    """The most Argon2 memory an unlock with these keys may take, KiB."""
    if keys.volume_key_file:
        return 0
    return max((s.kdf.memory for c in copies if c.vol is not None for s in c.vol.keyslots
                if isinstance(s.kdf, Argon2) and keys.key_slot in (None, s.id)), default=0)


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


Opener = Callable[[VolumeConfig, MemoryGate], OpenVolume]


def open_volumes(configs: Sequence[VolumeConfig], workers: int, argon2_cap_kib: int | None = None,
                 done: Callable[[str, OpenVolume | Exception], object] | None = None,
                 opener: Opener = open_volume,
                 ) -> tuple[list[OpenVolume], dict[str, Exception]]:
    """Open many volumes, up to `workers` at once (the KDFs run in C with the
    GIL released) and with at most `argon2_cap_kib` of Argon2 memory (default:
    half the machine's) at once; those that fail are logged with their reason
    and left out. The opened ones in the order given, and each failure by
    export name; `done(name, volume or failure)` is called (on the opening
    thread) as each is settled."""
    gate = MemoryGate(argon2_cap_kib or half_the_memory_kib())
    opened: dict[str, OpenVolume] = {}
    failed: dict[str, Exception] = {}

    def one(config: VolumeConfig) -> None:
        try:
            volume = opener(config, gate)
        except Exception as e:  # a bug in one must not hang the others
            failed[config.name] = e
            log.error("export not served", export=config.name,
                      error=_reason(e), kind=type(e).__name__)
            if done is not None:
                done(config.name, e)
            return
        opened[config.name] = volume
        log.info("export unlocked" if volume.header else "export opened", export=config.name,
                 **volume.log_fields())
        if done is not None:
            done(config.name, volume)

    todo: queue.SimpleQueue[VolumeConfig] = queue.SimpleQueue()
    for config in configs:
        todo.put(config)

    def work() -> None:
        while True:
            try:
                config = todo.get_nowait()
            except queue.Empty:
                return
            one(config)

    # Daemon threads, joined from here: a stop signal ends the wait at once
    # and the process can exit under a KDF still running (see luks.kdf).
    threads = [threading.Thread(target=work, name="unlock", daemon=True)
               for _ in range(max(1, min(workers, len(configs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [opened[c.name] for c in configs if c.name in opened], failed


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)
