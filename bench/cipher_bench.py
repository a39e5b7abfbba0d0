"""Sector-cipher throughput, and where the AES-XTS engines cross over.

    python -m bench.cipher_bench [--mib 16] [--rounds 5] [--section all]

Sections:
- bulk: one request over the whole buffer, next to the floor of this design
  (one plain AES-ECB pass over the same buffer) and, for scale, the naive
  approach of one `cryptography` XTS context per sector;
- requests: up to 4 MiB of it in requests of 4 KiB and 1 MiB, as a server
  sees them;
- crossover: for each sector size, the largest request (in units) for which
  libcrypto's EVP one unit at a time beats the numpy pipeline. This is the
  source of truth of `EVP_MAX_UNITS` in nbdluks/luks/engines.py: the section
  ends with the table as measured here.
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdluks.luks.cipher import CipherSpec, SectorCipher

SPECS = ("aes-xts-plain64", "aes-cbc-essiv:sha256")
REQUESTS = (4096, 1 << 20)
CROSSOVER_SIZES = (512, 1024, 2048, 4096)
CROSSOVER_COUNTS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256)


def best(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def per_call(fns: dict[str, Callable[[], object]], rounds: int,
             budget: float = 0.005) -> dict[str, float]:
    """Seconds per call of each short fn: the best of `rounds` batches of
    ~`budget` s each, the fns taking turns so that a burst of load elsewhere
    does not land on one of them only."""
    reps = {}
    for name, fn in fns.items():
        fn()  # warm: per-thread contexts and scratch buffers
        reps[name] = max(1, int(budget / best(fn, 5)))
    times = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = reps[name]
            times[name] = min(times[name], best(lambda fn=fn, n=n: [fn() for _ in range(n)], 1) / n)
    return times


def line(label: str, mib: float, t: float, t_ecb: float) -> None:
    print(f"{label:52s} {mib / t:7.0f} MiB/s  ratio {t_ecb / t:.2f}")


def bulk(key: bytes, buf: bytearray, rounds: int, t_ecb: float) -> None:
    mib = len(buf) / (1 << 20)
    for spec in SPECS:
        k = key if "xts" in spec else key[:32]
        for ss in (512, 4096):
            sc = SectorCipher(CipherSpec.parse(spec), k, ss)
            for op in ("decrypt", "encrypt"):
                fn = getattr(sc, op)
                t = best(lambda fn=fn: fn(buf, 0), rounds)
                line(f"{spec} {op} {ss}-byte sectors ({sc.engine})", mib, t, t_ecb)
    for ss in (512, 4096):
        def naive(ss: int = ss) -> None:
            for j in range(0, len(buf), ss):
                iv = struct.pack("<Q", j // 512) + bytes(8)
                Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor().update(buf[j : j + ss])
        line(f"naive per-sector XTS contexts, {ss}", mib, best(naive, 1), t_ecb)


def requests(key: bytes, buf: bytearray, rounds: int, t_ecb: float) -> None:
    view = memoryview(buf)[: 4 << 20]  # CBC encryption of small requests is slow
    mib = len(view) / (1 << 20)
    t_ecb *= len(view) / len(buf)  # the floor over as many bytes
    for spec in SPECS:
        k = key if "xts" in spec else key[:32]
        for ss in (512, 4096):
            sc = SectorCipher(CipherSpec.parse(spec), k, ss)
            for size in REQUESTS:
                for op in ("decrypt", "encrypt"):
                    fn = getattr(sc, op)

                    def run(fn: Callable[..., None] = fn, size: int = size, ss: int = ss) -> None:
                        for off in range(0, len(view), size):
                            fn(view[off : off + size], off // 512)
                    t = best(run, rounds)
                    us = t / (len(view) // size) * 1e6
                    label = f"{spec} {op} {ss} in {size // 1024} KiB, {us:.1f} us/req"
                    line(label, mib, t, t_ecb)


def crossover(key: bytes, rounds: int) -> None:
    """For each EVP engine and sector size, the largest count measured up to
    which it beats numpy at every count; ALWAYS when it wins at every count."""
    from nbdluks.luks import engines, evp

    loops = [e for e in ("openssl-evp", "openssl-evp+c") if e != "openssl-evp+c" or evp._xtsloop]
    spec = CipherSpec.parse("aes-xts-plain64")
    found: dict[str, dict[int, str]] = {e: {} for e in loops}
    for ss in CROSSOVER_SIZES:
        ciphers = {e: SectorCipher(spec, key, ss, engine=e) for e in ["numpy", *loops]}
        for n in CROSSOVER_COUNTS:
            buf = bytearray(os.urandom(ss * n))
            t = per_call({e: lambda c=c, b=buf: c.decrypt(b, 0) for e, c in ciphers.items()},
                         rounds)
            cells = "  ".join(f"{e} {v * 1e6:8.1f} us" for e, v in t.items())
            print(f"{ss:5d}-byte sectors x{n:4d}: {cells}")
            for e in loops:
                if ss not in found[e] and t[e] > t["numpy"]:
                    found[e][ss] = str(max([0, *(c for c in CROSSOVER_COUNTS if c < n)]))
        for e in loops:
            found[e].setdefault(ss, "ALWAYS")
    for e in loops:
        table = ", ".join(f"{ss}: {v}" for ss, v in found[e].items())
        print(f"measured crossover, {e}: {{{table}}}")
    now = {ss: engines.evp_max_units(ss) for ss in CROSSOVER_SIZES}
    table = ", ".join(f"{ss}: {'ALWAYS' if v == engines.ALWAYS else v}" for ss, v in now.items())
    print(f"EVP_MAX_UNITS in nbdluks/luks/engines.py (the ctypes loop): {{{table}}}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16, help="buffer size (MiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--section", choices=("all", "bulk", "requests", "crossover"),
                    default="all")
    args = ap.parse_args()
    size = args.mib << 20
    key = os.urandom(64)
    buf = bytearray(os.urandom(size))
    out = bytearray(size + 16)
    ecb = Cipher(algorithms.AES(key[:32]), modes.ECB()).decryptor()
    t_ecb = best(lambda: ecb.update_into(buf, out), args.rounds)
    print(f"buffer {args.mib} MiB, best of {args.rounds}")
    line("AES-256-ECB, one pass (floor)", size / (1 << 20), t_ecb, t_ecb)
    if args.section in ("all", "bulk"):
        bulk(key, buf, args.rounds, t_ecb)
    if args.section in ("all", "requests"):
        requests(key, buf, args.rounds, t_ecb)
    if args.section in ("all", "crossover"):
        crossover(key, args.rounds)


if __name__ == "__main__":
    main()
