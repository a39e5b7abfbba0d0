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


def test_how_long_a_headers_kdf_would_take_here() -> None:
    from nbdluks.luks.volume import Argon2, Pbkdf2

    calibrate._rates.clear()
    small = Pbkdf2("sha256", 1000, bytes(32))
    assert calibrate.kdf_seconds(small, 64, ignore_below=1) == 0  # sure to be quick
    assert not calibrate._rates  # so nothing was measured
    huge = Pbkdf2("sha256", 2**31 - 1, bytes(32))
    one_block = calibrate.kdf_seconds(huge, 32)
    assert 60 < one_block < 100_000  # minutes: ~3.5 M iterations/s on a 2024 core
    # each 32-byte output block of PBKDF2-SHA256 runs every iteration again
    assert calibrate.kdf_seconds(huge, 64) == 2 * one_block
    hours = calibrate.kdf_seconds(Argon2("argon2id", 2**32 - 1, 32, 1, bytes(32)), 64)
    four_gib = calibrate.kdf_seconds(Argon2("argon2id", 4, 4 << 20, 4, bytes(32)), 64)
    # 2^32 passes over 32 KiB: half a day to days here, depending on the load
    # the rate was measured under; far beyond any limit either way
    assert hours > 3600 and 0.5 < four_gib < 600  # 4 passes over 4 GiB: seconds
