"""Reencryption of a LUKS2 volume under a new volume key (cipher and sector
size may change too), on any source and without root: cryptsetup's
protocol, step by step, so that either tool resumes what the other began.

Per step (docs/cryptsetup-reencryption.md, 7): read the hotzone's original
bytes; write their checksums (or the bytes: journal) to the resilience
area and commit the "hot" header; rewrite the zone under the new key; sync;
commit the "post" header. A crash leaves either a clean state or an
interrupted step, which is recovered (checksum: the blocks still as they
were are rewritten; journal: the zone rewritten from the journal) before
anything else. The last step commits the final header in ONE write.
A stop signal takes effect between two steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import structlog

from .. import signals
from ..block import BlockDevice
from ..luks import (
    RESILIENCES,
    Boundary,
    CipherSpec,
    Luks2Header,
    LuksError,
    Reencryption,
    SectorCipher,
    Step,
    Volume,
    Write,
    hash_size,
    logical_size,
    new_volume_key,
    plan_add_key,
    reencryption_keys,
    rotation,
    unlock_with_passphrase,
    wipe,
)
from ..luks import hotzone as hz
from ..unlock import (
    SourceError,
    UnlockOptions,
    given_secret,
    open_source,
    reencryption_lock,
    release_lock,
    unlock_with_tokens,
)
from .carry import Carry, gather, same_kdf
from .kdf import KdfOptions, digest_iterations, slot_spec
from .store import HeaderStore, ManageError, reread
from .target import Target, require, write

log = structlog.get_logger("nbdluks.manage")
DEFAULT_HOTZONE = 16 * 1024 * 1024
ONLINE_HOTZONE = 4 * 1024 * 1024  # clients that touch it wait for its step
ONLINE_RATE = 64.0  # MiB/s
PROGRESS_EVERY = 10.0  # seconds between two progress lines in the log


@dataclass(frozen=True)
class ReencryptOptions:
    resilience: str = "checksum"
    hash: str = "sha256"  # of the checksums
    hotzone_size: int = DEFAULT_HOTZONE  # bytes, at most
    cipher: str | None = None  # None: the current one
    key_size: int | None = None  # bytes; None: the current size
    sector_size: int | None = None
    init_only: bool = False
    resume_only: bool = False
    kdf: KdfOptions | None = None  # the new key slots' KDF; None: what the old ones cost

    def check(self) -> None:
        if self.resilience not in RESILIENCES:
            raise ManageError(f"resilience {self.resilience!r} is not one of "
                              f"{', '.join(RESILIENCES)}")
        if not hash_size(self.hash):
            raise ManageError(f"hash {self.hash!r} is not available here")
        if self.sector_size is not None and self.sector_size not in (512, 1024, 2048, 4096):
            raise ManageError(f"sector size {self.sector_size} is not 512, 1024, 2048 or 4096")
        if self.cipher is not None:
            try:
                CipherSpec.parse(self.cipher)
            except LuksError as e:
                raise ManageError(str(e)) from None


@dataclass(frozen=True)
class Progress:
    done: int
    size: int
    finished: bool  # (or none in progress)
    uuid: str = ""


def reencrypt(target: Target, payload: str, keys: UnlockOptions, opts: ReencryptOptions,
              *, settle_only: bool = False, may_start: bool = True,
              held: str | None = None) -> Progress:
    """Start (or resume) the reencryption and run it to its end, or to the
    step at which a stop signal arrived. `settle_only`: start it, recover an
    interrupted step, and stop there (a server goes on with it). With no key
    given, the volume's clevis tokens give the passphrases (Tang). `held`:
    the uuid of a volume whose reencryption lock this server holds already
    (it serves the volume, its reencryption stopped)."""
    require(not keys.volume_key_file, "reencryption needs a passphrase, a key file or a "
            "token: the new key slots take it (cryptsetup gives them the old slots' "
            "passphrases too)")
    store = HeaderStore.open(target.header, target.upstream)
    lock = dev = secret = None
    try:
        vol = store.read(target.argon2_max_kib)
        require(vol.version == 2, "only LUKS2 volumes are reencrypted here (a LUKS1 volume: "
                "cryptsetup reencrypt offline, or cryptsetup convert first)")
        try:
            lock = reencryption_lock(vol.uuid, exclusive=True)
        except SourceError:
            if vol.uuid != held:  # (held shared by this server: no cryptsetup runs)
                raise
        vol = store.read(target.argon2_max_kib)  # what the lock now guards
        dev = _data(store, target, payload)
        secret = given_secret(keys) if keys.given() else None
        if vol.reencryption is None:
            require(not opts.resume_only, f"{target.header} is not being reencrypted")
            if not may_start:
                return Progress(0, 0, True, vol.uuid)
            vol.check_servable()
            carry = gather(vol, store.copy().read_area, secret, keys)
            try:
                _start(store, target, vol, carry, keys.key_slot, opts)
            finally:
                carry.wipe()
            if opts.init_only:
                return Progress(0, 0, False)
        else:
            require(not opts.init_only, f"{target.header} is being reencrypted already")
        ciphers = _ciphers(store, secret, keys)
        run = _Run(store, target, dev, ciphers, opts)
        got = run.settle() if settle_only else run.run()
        return replace(got, uuid=store.vol.uuid if store.vol else "")
    finally:
        if secret is not None:
            wipe(secret)
        if dev is not None and dev is not store.dev:
            dev.close()
        if lock is not None:
            release_lock(lock, store.vol.uuid if store.vol else "")
        store.close()


def _data(store: HeaderStore, target: Target, payload: str) -> BlockDevice:
    """The payload, writable: the header's device itself when attached."""
    if os.path.realpath(payload) == os.path.realpath(target.header):
        return store.dev
    return open_source(payload, read_only=False, upstream=target.upstream)


def _start(store: HeaderStore, target: Target, vol: Volume, carry: Carry,
           key_slot: int | None, opts: ReencryptOptions) -> None:
    """New key slots for the new key (one write each, with the old slot's
    tokens), then the write that turns the reencryption on."""
    read_area = store.copy().read_area
    first, secret = next(iter(carry.passphrases.items()))
    unlocked = unlock_with_passphrase(vol, secret, read_area, first)
    bound = vol.json["digests"][rotation.data_digest(vol.json)]["keyslots"]
    others = sorted(set(map(int, bound)) - set(carry.passphrases))
    require(not others or key_slot is not None, "key slots "
            f"{', '.join(map(str, others))} do not open with this key and would be lost when "
            "the reencryption ends: name the one key slot to keep (as cryptsetup asks)")
    if others:
        log.warning("key slots not carried over are removed when the reencryption ends",
                    keyslots=others)
    seg = vol.segment
    size = opts.key_size or len(unlocked.key)
    new_key = new_volume_key(size)
    try:
        spec = rotation.RotationSpec(
            opts.cipher or seg.cipher, size, opts.sector_size or seg.sector_size,
            opts.resilience, opts.hash,
            max(seg.sector_size, opts.sector_size or seg.sector_size))
        spec.check()
        SectorCipher(CipherSpec.parse(spec.cipher), new_key, spec.sector_size)  # usable?
        assert store.vol is not None
        header = Luks2Header.from_volume(store.vol, store.raw)
        iterations = digest_iterations(KdfOptions(), size)
        new = rotation.new_digest(header, new_key, "sha256", iterations)
        for slot, passphrase in carry.passphrases.items():
            sid = header.free_slot()
            tokens = rotation.carry_tokens(header, slot, sid)
            kdf = same_kdf(vol, slot) if opts.kdf is None else \
                slot_spec(opts.kdf, 2, spec.cipher, size)
            plan = plan_add_key(header, new_key, passphrase, kdf, sid,
                                digest=new,
                                priority=vol.json["keyslots"][str(slot)].get("priority"))
            write(store, target, plan, "key slot for the new volume key added")
            log.info("key slot carried to the new volume key", keyslot=slot, new_keyslot=sid,
                     tokens=tokens)
            assert store.vol is not None
            header = Luks2Header.from_volume(store.vol, store.raw)
        steps = rotation.begin(header, spec, new, unlocked.key, new_key, iterations)
        _commit(store, target, steps, "reencryption started")
        log.info("reencryption started", source=target.header, resilience=spec.resilience,
                 cipher=spec.cipher, sector_size=spec.sector_size,
                 keyslots=list(carry.passphrases))
    finally:
        wipe(new_key)
        unlocked.wipe()


def _ciphers(store: HeaderStore, secret: bytearray | None, keys: UnlockOptions
             ) -> tuple[SectorCipher, SectorCipher]:
    """The old and the new key's sector ciphers, both keys checked against
    the header's verification digest (from the secret, or a token)."""
    vol = store.vol
    assert vol is not None and vol.reencryption is not None
    state: Reencryption = vol.reencryption
    try:
        hz.supported(state)
    except LuksError as e:
        raise ManageError(str(e)) from None
    read_area = store.copy().read_area
    if secret is None:
        first = unlock_with_tokens(vol, read_area, keys.tokens, keys.key_slot, keys.kdf_limit)
    else:
        first = unlock_with_passphrase(vol, secret, read_area, keys.key_slot)
        try:
            first.keys = reencryption_keys(vol, secret, read_area, first)
        except BaseException:
            first.wipe()
            raise
    try:
        made = []
        for flag, digest in (("backup-previous", state.old_digest),
                             ("backup-final", state.new_digest)):
            seg = hz.backup(state.md, flag)
            made.append(SectorCipher(CipherSpec.parse(seg["encryption"]),
                                     first.keys[digest or ""], seg["sector_size"]))
        return made[0], made[1]
    finally:
        first.wipe()


def _commit(store: HeaderStore, target: Target, steps: list[Step], what: str) -> None:
    """One of the reencryption's header writes (each step has two)."""
    store.apply(steps)
    store.verify([s for s in steps if isinstance(s, Write) and s.offset < store.header_end()])
    reread(store, target.argon2_max_kib)
    log.debug(what, source=target.header)


class _Run:
    """The steps of one reencryption, from the header's state to the end.
    `boundary`: shared with a server that serves the volume meanwhile (each
    step holds its zone there); `rate`: bytes per second at most."""

    def __init__(self, store: HeaderStore, target: Target, dev: BlockDevice,
                 ciphers: tuple[SectorCipher, SectorCipher], opts: ReencryptOptions,
                 boundary: Boundary | None = None, rate: float | None = None) -> None:
        self.store, self.target, self.dev, self.opts = store, target, dev, opts
        self.old, self.new = ciphers
        self.boundary, self.rate = boundary, rate
        state = self.state  # checked by hotzone.supported: by _ciphers, or by the device
        assert state.old_digest is not None and state.new_digest is not None
        self.old_digest, self.new_digest = state.old_digest, state.new_digest
        prev, final = hz.backup(state.md, "backup-previous"), hz.backup(state.md, "backup-final")
        self.base = int(final["offset"])
        align = max(prev["sector_size"], final["sector_size"])
        total = logical_size(state, dev.size)
        self.size = total - total % align

    @property
    def state(self) -> Reencryption:
        assert self.store.vol is not None and self.store.vol.reencryption is not None
        return self.store.vol.reencryption  # type: ignore[no-any-return]

    def finished(self) -> bool:
        assert self.store.vol is not None
        return self.store.vol.reencryption is None

    def settle(self) -> Progress:
        """An interrupted step recovered; the progress then."""
        if not self.finished() and self.state.crashed:
            self._recover()
        if self.finished():
            return Progress(self.size, self.size, True)
        return Progress(hz.done(self.state, self.size), self.size, False)

    def run(self) -> Progress:
        """Step after step; a stop signal is noted and obeyed between two
        (a mask would not do: a signal may land on any thread)."""
        signals.defer()
        began, moved = time.monotonic(), 0
        said = began
        while not self.finished():
            if signals.stop_requested():
                done = hz.done(self.state, self.size)
                log.info("reencryption stopped; resuming it goes on from here", done=done,
                         size=self.size)
                return Progress(done, self.size, False)
            if self.state.crashed:
                self._recover()
                continue
            done = hz.done(self.state, self.size)
            if done >= self.size:
                self._finish()
                break
            zone = hz.next_zone(done, self.size, hz.capacity(self.state, self.opts.hotzone_size))
            assert zone is not None
            if self.boundary is None:
                self._step(zone)
            else:
                with self.boundary.step(done, zone.start, zone.end):
                    self._step(zone)
            log.debug("reencryption step done", done=zone.end, size=self.size)
            moved += zone.length
            if time.monotonic() - said >= PROGRESS_EVERY:
                said = time.monotonic()
                log.info("reencryption progress", done=zone.end, size=self.size,
                         rate_mib_s=round(moved / (said - began) / 2**20, 1))
            if self.rate:  # the average since the start stays under the rate
                _wait_until(began + moved / self.rate)
        log.info("reencryption finished", size=self.size)
        return Progress(self.size, self.size, True)

    def _read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.dev.pread_into(memoryview(buf), offset)
        return buf

    def _transform(self, buf: bytearray | memoryview, start: int) -> None:
        self.old.decrypt(buf, start // 512)
        self.new.encrypt(buf, start // 512)

    def _header(self, md: dict[str, Any]) -> Luks2Header:
        assert self.store.vol is not None
        header = Luks2Header.from_volume(self.store.vol, self.store.raw)
        header.md = md
        return header

    def _step(self, zone: hz.Zone) -> None:
        area = self.state.md["keyslots"][self._reencrypt_slot()]["area"]
        raw = self._read(self.base + zone.start, zone.length)
        steps: list[Step] = []
        if area["type"] == "checksum":
            steps.append(Write(int(area["offset"]), hz.checksums(raw, area["hash"],
                                                                 area["sector_size"])))
        elif area["type"] == "journal":
            steps.append(Write(int(area["offset"]), bytes(raw)))
        if area["type"] != "none":
            hot = hz.layout(self.state, self.size, zone.start, zone.length)
            _commit(self.store, self.target, steps + self._header(hot).writes(), "hotzone")
        self._transform(raw, zone.start)
        self.dev.pwrite(raw, self.base + zone.start)
        self.dev.flush()
        self._post(zone)

    def _post(self, zone: hz.Zone) -> None:
        if zone.end >= self.size:
            self._finish()
            return
        post = hz.layout(self.state, self.size, zone.end)
        _commit(self.store, self.target, self._header(post).writes(), "hotzone done")

    def _reencrypt_slot(self) -> str:
        return str(next(k for k, v in self.state.md["keyslots"].items()
                        if v["type"] == "reencrypt"))

    def _recover(self) -> None:
        """An interrupted step finished from its resilience area."""
        zone = hz.hotzone(self.state)
        area = self.state.md["keyslots"][self._reencrypt_slot()]["area"]
        at = self.base + zone.start
        if area["type"] == "checksum":
            block = int(area["sector_size"])
            raw = self._read(at, zone.length)
            stored = bytes(self._area(area, zone.length // block * (hash_size(area["hash"]) or 0)))
            blocks = hz.still_old(raw, stored, area["hash"], block)
            for i in blocks:
                view = memoryview(raw)[i : i + block]
                self._transform(view, zone.start + i)
                self.dev.pwrite(view, at + i)
            log.info("interrupted step recovered", resilience="checksum", start=zone.start,
                     length=zone.length, rewritten=len(blocks))
        elif area["type"] == "journal":
            journal = self._area(area, zone.length)
            self._transform(journal, zone.start)
            self.dev.pwrite(journal, at)
            log.info("interrupted step recovered", resilience="journal", start=zone.start,
                     length=zone.length)
        else:
            raise ManageError("a step of a reencryption without resilience was interrupted: "
                              "the zone it was rewriting cannot be recovered")
        self.dev.flush()
        self._post(zone)

    def _area(self, area: dict[str, Any], length: int) -> bytearray:
        buf = bytearray(length)
        self.store.dev.pread_into(memoryview(buf), int(area["offset"]))
        return buf

    def _finish(self) -> None:
        header = self._header(self.state.md)
        _commit(self.store, self.target,
                rotation.finish(header, self.old_digest, self.new_digest),
                "reencryption finished")


def _wait_until(until: float) -> None:
    """Sleep until the monotonic clock reaches `until`, in slices, so that a
    stop ends the wait (a reload waits for it). The time left is read once
    per slice: read twice, a process descheduled between the two reads (CPU
    starved) asked for a negative sleep, and the ValueError ended the
    reencryption while the server served on (issue 21)."""
    while not signals.stop_requested():
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(0.05, left))


def run_beside(target: Target, payload: str, dev: BlockDevice, opts: ReencryptOptions,
               rate: float | None) -> int:
    """The reencryption of a volume a server serves through `dev` (a
    RotatingDevice: its ciphers and boundary), in this process; its exit
    status (0: finished, or stopped between two steps)."""
    ciphers = dev.ciphers()  # type: ignore[attr-defined]
    boundary: Boundary = dev.boundary  # type: ignore[attr-defined]
    with HeaderStore.open(target.header, target.upstream) as store:
        store.read(target.argon2_max_kib)
        data = _data(store, target, payload)
        try:
            progress = _Run(store, target, data, ciphers, opts, boundary, rate).run()
        finally:
            if data is not store.dev:
                data.close()
    return 0 if progress.finished or signals.stop_requested() else 1
