"""KDF costs calibrated to a time, as cryptsetup's benchmark picks them
(lib/crypto_backend/pbkdf_check.c): PBKDF2 iterations from a measured rate;
Argon2 memory first, then time, grown or shrunk until one derivation takes
the target within -5/+10 %. And the other way: how long a header's KDF
would take here, from a quick measured rate. Pure computation, no I/O."""

from __future__ import annotations

import hashlib
import time

from .kdf import PBKDF2_MAX_ITERATIONS, derive
from .volume import Argon2, Kdf, Pbkdf2

PBKDF2_MIN_ITERATIONS = 1000  # NIST SP 800-132, cryptsetup's floor
ARGON2_MIN_TIME = 4
ARGON2_MIN_MEMORY = 32  # KiB
ARGON2_MAX_MEMORY = 4 * 1024 * 1024  # KiB
ARGON2_MAX_PARALLEL = 4
_BENCH_MIN_MS = 250
_BENCH_FAST_MS = 10
_PASSWORD = b"foobarfo"  # what cryptsetup benchmarks with
_SALT = bytes(32)


def _ms(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return (time.perf_counter() - start) * 1000


def pbkdf2_iterations(hash_name: str, key_size: int, target_ms: int) -> int:
    """Iterations of PBKDF2-`hash_name` that take `target_ms` here."""
    iterations = 1 << 12
    while True:
        kdf = Pbkdf2(hash_name, iterations, _SALT)
        ms = _ms(lambda: derive(kdf, _PASSWORD, key_size))  # noqa: B023
        if ms >= _BENCH_MIN_MS or iterations >= 1 << 30:
            break
        iterations *= 2 if ms >= _BENCH_FAST_MS else 16
    rate = iterations / max(ms, 1.0)
    return max(PBKDF2_MIN_ITERATIONS, min(int(rate * target_ms), PBKDF2_MAX_ITERATIONS))


def _measure(kind: str, t: int, m: int, parallel: int, key_size: int) -> float:
    kdf = Argon2(kind, t, m, parallel, _SALT)
    return _ms(lambda: derive(kdf, _PASSWORD, key_size))


def _next(t: int, m: int, ms: float, target: int, min_m: int, max_m: int
          ) -> tuple[int, int, bool]:
    """cryptsetup's next_argon2_params: (time, memory, final)."""
    ms = max(ms, 1.0)
    if ms > target:  # lower time first, then memory
        new_t = int(t * target / ms)
        if new_t < ARGON2_MIN_TIME:
            new_m = int(t * m * target / (ARGON2_MIN_TIME * ms))
            if new_m < min_m:
                return ARGON2_MIN_TIME, min_m, True
            return ARGON2_MIN_TIME, new_m, (ARGON2_MIN_TIME, new_m) == (t, m)
        return new_t, m, (new_t, m) == (t, m)
    new_m = int(m * target / ms)  # raise memory first, then time
    if new_m > max_m:
        new_t = int(t * m * target / (max_m * ms))
        if new_t <= ARGON2_MIN_TIME:
            return ARGON2_MIN_TIME, max_m, True
        return new_t, max_m, (new_t, max_m) == (t, m)
    if new_m < min_m:
        return t, min_m, True
    return t, new_m, (t, new_m) == (t, m)


def argon2_cost(kind: str, max_memory: int, parallel: int, key_size: int,
                target_ms: int) -> tuple[int, int]:
    """(time, memory KiB) of Argon2 `kind` taking about `target_ms` here,
    with memory at most `max_memory` KiB."""
    min_m = max(ARGON2_MIN_MEMORY, 8 * parallel)
    max_m = max(min_m, max_memory)
    t, m = ARGON2_MIN_TIME, min_m
    while True:  # 1. parameters slow enough to measure
        ms = _measure(kind, t, m, parallel, key_size)
        if ms >= _BENCH_MIN_MS:
            break
        if m == max_m:
            new_t = t * 16 if ms < _BENCH_FAST_MS else int(t * _BENCH_MIN_MS / max(ms, 1.0))
            if new_t == t:
                break
            t = new_t
        else:
            new_m = m * 16 if ms < _BENCH_FAST_MS else int(m * _BENCH_MIN_MS / max(ms, 1.0))
            if new_m == m:
                break
            m = min(new_m, max_m)
    for _ in range(8):  # 2. estimate, measure, correct within -5/+10 %
        t, m, final = _next(t, m, ms, target_ms, min_m, max_m)
        if final:
            break
        ms = _measure(kind, t, m, parallel, key_size)
        if target_ms * 0.95 <= ms <= target_ms * 1.10:
            break
    return t, m


# Rates slower than any machine this runs on: work that takes less than the
# bound at these is not measured (PBKDF2: iterations of one output block per
# second; Argon2: KiB times passes per second).
_SLOW_PBKDF2 = 100_000
_SLOW_ARGON2 = 50_000
_rates: dict[str, float] = {}  # measured once per process and kind


def _rate(kind: str) -> float:
    """This machine's rate for PBKDF2-`kind` (a hash) or Argon2 `kind`."""
    if kind not in _rates:
        if kind.startswith("argon2"):
            work = 16 * 1024 * 2
            ms = _measure(kind, 2, 16 * 1024, 4, 32)
        else:
            work = 1 << 15
            ms = _ms(lambda: derive(Pbkdf2(kind, work, _SALT), _PASSWORD,
                                    hashlib.new(kind).digest_size))
        _rates[kind] = work / max(ms, 0.01) * 1000
    return _rates[kind]


def kdf_seconds(kdf: Kdf, length: int, ignore_below: float = 0.0) -> float:
    """About how many seconds deriving `length` bytes with `kdf` takes here;
    0 for work sure to take less than `ignore_below` (not measured)."""
    if isinstance(kdf, Pbkdf2):
        size = hashlib.new(kdf.hash).digest_size
        work = kdf.iterations * -(-length // size)  # each output block on its own
        kind, slow = kdf.hash, _SLOW_PBKDF2
    else:
        work, kind, slow = kdf.time * kdf.memory, kdf.type, _SLOW_ARGON2
    if work / slow < ignore_below:
        return 0.0
    return work / _rate(kind)
