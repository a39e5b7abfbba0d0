"""Bulk sector-cipher throughput next to the floor of this design: one plain
AES-ECB pass over the same buffer (and, for scale, the naive approach of one
`cryptography` XTS context per sector).

    python bench/cipher_bench.py [--mib 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import struct
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdluks.luks.cipher import CipherSpec, SectorCipher


def best(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16, help="buffer size (MiB)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = args.mib << 20
    key = os.urandom(64)
    buf = bytearray(os.urandom(size))
    out = bytearray(size + 16)
    ecb = Cipher(algorithms.AES(key[:32]), modes.ECB()).decryptor()
    t_ecb = best(lambda: ecb.update_into(buf, out), args.rounds)
    mib = size / (1 << 20)
    print(f"buffer {args.mib} MiB, best of {args.rounds}")
    print(f"{'AES-256-ECB, one pass (floor)':44s} {mib / t_ecb:9.0f} MiB/s  ratio 1.00")
    for spec in ("aes-xts-plain64", "aes-cbc-essiv:sha256"):
        k = key if "xts" in spec else key[:32]
        for ss in (512, 4096):
            sc = SectorCipher(CipherSpec.parse(spec), k, ss)
            for op in ("decrypt", "encrypt"):
                fn = getattr(sc, op)
                t = best(lambda fn=fn: fn(buf, 0), args.rounds)
                label = f"{spec} {op} {ss}-byte sectors"
                print(f"{label:44s} {mib / t:9.0f} MiB/s  ratio {t_ecb / t:.2f}")
    for ss in (512, 4096):
        def naive(ss: int = ss) -> None:
            for j in range(0, size, ss):
                iv = struct.pack("<Q", j // 512) + bytes(8)
                Cipher(algorithms.AES(key), modes.XTS(iv)).decryptor().update(buf[j : j + ss])
        t = best(naive, 1)
        label = f"naive per-sector XTS contexts, {ss}"
        print(f"{label:44s} {mib / t:9.0f} MiB/s  ratio {t_ecb / t:.2f}")


if __name__ == "__main__":
    main()
