"""The KDF of a new key slot, and the iterations of a new volume-key
digest, from the user's choices: cryptsetup's defaults (argon2id for LUKS2,
PBKDF2 for LUKS1, 2 s, 1 GiB, up to 4 threads) and its rules (forced costs
skip the benchmark; Argon2 memory at most half of the RAM)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import structlog

from ..luks import (
    ARGON2_MAX_MEMORY,
    ARGON2_MAX_PARALLEL,
    ARGON2_MIN_MEMORY,
    ARGON2_MIN_TIME,
    PBKDF2_MAX_ITERATIONS,
    PBKDF2_MIN_ITERATIONS,
    Argon2,
    Pbkdf2,
    SlotSpec,
    argon2_cost,
    hash_size,
    pbkdf2_iterations,
)
from .store import ManageError

log = structlog.get_logger("nbdluks.manage")

DEFAULT_ITER_TIME = 2000  # ms, cryptsetup's DEFAULT_LUKS{1,2}_ITER_TIME
DEFAULT_MEMORY = 1024 * 1024  # KiB, DEFAULT_LUKS2_MEMORY_KB
DIGEST_MS = 125  # LUKS_MKD_ITERATIONS_MS
KDF_TYPES = ("argon2id", "argon2i", "pbkdf2")


@dataclass(frozen=True)
class KdfOptions:
    pbkdf: str | None = None  # None: argon2id for LUKS2, pbkdf2 for LUKS1
    hash: str = "sha256"
    iter_time: int = DEFAULT_ITER_TIME  # ms
    force_iterations: int | None = None  # skips the benchmark
    memory: int | None = None  # KiB
    parallel: int | None = None

    def kind(self, version: int) -> str:
        kind = self.pbkdf or ("pbkdf2" if version == 1 else "argon2id")
        if kind not in KDF_TYPES:
            raise ManageError(f"PBKDF {kind!r} is not one of {', '.join(KDF_TYPES)}")
        if version == 1 and kind != "pbkdf2":
            raise ManageError(f"LUKS1 key slots use pbkdf2 only, not {kind}")
        return kind

    def check(self, version: int) -> None:
        kind = self.kind(version)
        size = hash_size(self.hash) if self.hash else None
        if not size:  # unknown, or shake (no fixed size)
            raise ManageError(f"hash {self.hash!r} is not available here")
        if size < 20 and version == 1:
            raise ManageError(f"LUKS1 needs a hash of 20 bytes or more, {self.hash} has {size}")
        if self.iter_time <= 0:
            raise ManageError(f"the iteration time must be above 0 ms, not {self.iter_time}")
        low, high = ((PBKDF2_MIN_ITERATIONS, PBKDF2_MAX_ITERATIONS) if kind == "pbkdf2"
                     else (ARGON2_MIN_TIME, 2**32 - 1))
        if self.force_iterations is not None and not low <= self.force_iterations <= high:
            raise ManageError(f"forced {kind} iterations must be {low} to {high}, not "
                              f"{self.force_iterations}")
        if self.memory is not None and not ARGON2_MIN_MEMORY <= self.memory <= ARGON2_MAX_MEMORY:
            raise ManageError(f"the Argon2 memory must be {ARGON2_MIN_MEMORY} to "
                              f"{ARGON2_MAX_MEMORY} KiB, not {self.memory}")
        if self.parallel is not None and not 1 <= self.parallel <= ARGON2_MAX_PARALLEL:
            raise ManageError(f"the Argon2 threads must be 1 to {ARGON2_MAX_PARALLEL}, "
                              f"not {self.parallel}")


def _half_ram_kib() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2048
    except (ValueError, OSError):
        return DEFAULT_MEMORY


def slot_kdf(opts: KdfOptions, version: int, key_size: int, hash_name: str) -> Pbkdf2 | Argon2:
    kind = opts.kind(version)
    salt = secrets.token_bytes(32)
    if kind == "pbkdf2":
        iterations = opts.force_iterations or pbkdf2_iterations(hash_name, key_size,
                                                                opts.iter_time)
        return Pbkdf2(hash_name, iterations, salt)
    memory = min(opts.memory or DEFAULT_MEMORY, _half_ram_kib())
    parallel = opts.parallel or min(ARGON2_MAX_PARALLEL, os.cpu_count() or 1)
    if opts.force_iterations:
        return Argon2(kind, opts.force_iterations, memory, parallel, salt)
    time_cost, memory = argon2_cost(kind, memory, parallel, key_size, opts.iter_time)
    log.debug("argon2 calibrated", time=time_cost, memory_kib=memory, threads=parallel)
    return Argon2(kind, time_cost, memory, parallel, salt)


def slot_spec(opts: KdfOptions, vol_version: int, cipher: str, key_size: int,
              luks1_hash: str = "") -> SlotSpec:
    """A new slot of a volume whose data uses `cipher` with `key_size`-byte keys:
    its area is encrypted the same way (cryptsetup's default keyslot cipher).
    A LUKS1 slot hashes with its header's hash, whatever the option says."""
    hash_name = luks1_hash if vol_version == 1 and luks1_hash else opts.hash
    return SlotSpec(slot_kdf(opts, vol_version, key_size, hash_name), cipher, key_size,
                    hash_name)


def digest_iterations(opts: KdfOptions, key_size: int) -> int:
    if opts.force_iterations:
        return PBKDF2_MIN_ITERATIONS
    return pbkdf2_iterations(opts.hash, key_size, DIGEST_MS)
