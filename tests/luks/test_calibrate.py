"""KDF calibration: cryptsetup's rules for the parameters it picks (the
time they take is not asserted: timings are for benchmarks)."""

from __future__ import annotations

from nbdluks.luks import calibrate


def test_pbkdf2_never_below_the_floor() -> None:
    assert calibrate.pbkdf2_iterations("sha256", 32, 0) == calibrate.PBKDF2_MIN_ITERATIONS
    assert calibrate.pbkdf2_iterations("sha256", 32, 200) > calibrate.PBKDF2_MIN_ITERATIONS


def test_argon2_stays_within_its_limits() -> None:
    t, m = calibrate.argon2_cost("argon2id", 16 * 1024, 2, 64, 100)
    assert t >= calibrate.ARGON2_MIN_TIME and 16 <= m <= 16 * 1024


def test_next_params_follow_cryptsetup() -> None:
    # too slow: time comes down first, then memory, never below the minimums
    assert calibrate._next(8, 1024, 400, 100, 32, 4096) == (4, 512, False)
    assert calibrate._next(4, 64, 10_000, 100, 32, 4096) == (4, 32, True)
    # too fast: memory goes up first, up to its cap, then time
    assert calibrate._next(4, 1024, 50, 100, 32, 4096) == (4, 2048, False)
    assert calibrate._next(4, 4096, 25, 100, 32, 4096) == (16, 4096, False)
