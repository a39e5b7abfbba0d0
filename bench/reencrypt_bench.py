"""Rotating a volume key: how fast, and what clients keep meanwhile.

    python -m bench.reencrypt_bench [--size MiB] [--rounds N]

Offline: `cryptsetup reencrypt --force-offline-reencrypt` and `nbdluks
reencrypt` on copies of one LUKS2 volume (aes-xts-plain64, 4096-byte
sectors, made by cryptsetup), resilience checksum and none, each with its
default hotzone; MiB/s and nbdluks/cryptsetup. Online: 4 KiB random reads
(fio, QD16) and a sequential read (nbdcopy) of the volume served by
nbdluks, idle and during `serve --reencrypt` at its default rate; the
ratio is what clients keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.server_bench import Server, nbdluks_cmd, rand_read, random_file, seq_read

MiB = 1 << 20
HEADER = 16 * MiB


def make_volume(tmp: Path, size: int) -> tuple[Path, Path]:
    pw = tmp / "pw"
    pw.write_bytes(b"benchmark passphrase")
    vol = tmp / "master.luks"
    random_file(vol, HEADER + size)
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--sector-size",
                    "4096", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                    "--key-file", str(pw), str(vol)], check=True)
    return vol, pw


def offline(tmp: Path, vol: Path, pw: Path, rounds: int, size: int) -> None:
    tools = {
        "cryptsetup": lambda f, r: ["cryptsetup", "reencrypt", "--force-offline-reencrypt",
                                    "-q", "--resilience", r, "--key-file", str(pw), str(f)],
        "nbdluks": lambda f, r: [sys.executable, "-m", "nbdluks", "reencrypt", "--payload",
                                 str(f), "--key-file", str(pw), "--resilience", r,
                                 "--log-level", "warning"],
    }
    for resilience in ("checksum", "none"):
        speeds: dict[str, list[float]] = {name: [] for name in tools}
        for _ in range(rounds):
            for name, cmd in tools.items():  # alternating, on fresh copies
                copy = tmp / "copy.luks"
                shutil.copyfile(vol, copy)
                subprocess.run(["sync"], check=True)
                t = time.perf_counter()
                subprocess.run(cmd(copy, resilience), check=True, stdout=subprocess.DEVNULL)
                speeds[name].append(size / MiB / (time.perf_counter() - t))
        ours, theirs = (statistics.median(speeds[n]) for n in ("nbdluks", "cryptsetup"))
        print(f"offline {resilience:9s} nbdluks {ours:7.1f} MiB/s  cryptsetup {theirs:7.1f} "
              f"MiB/s  ratio {ours / theirs:.2f}")


def online(tmp: Path, vol: Path, pw: Path, size: int) -> None:
    copy = tmp / "copy.luks"
    s = str(tmp / "s.sock")
    rows = {}
    for label, extra in (("idle", ()), ("reencrypting", ("--reencrypt",))):
        shutil.copyfile(vol, copy)
        with Server(label, nbdluks_cmd("--payload", str(copy), "--key-file", str(pw), "-k", s,
                                       *extra), s) as srv:
            began = time.monotonic()
            rows[label] = (rand_read(srv.uri, size), seq_read(srv.uri, size),
                           time.monotonic() - began)
        dump = subprocess.run(["cryptsetup", "luksDump", str(copy)], check=True,
                              capture_output=True, text=True).stdout
        if label != "idle" and "online-reencrypt" not in dump:
            print("(the reencryption finished before the measurement did: use a larger --size)")
    (iops0, mib0, _), (iops1, mib1, took) = rows["idle"], rows["reencrypting"]
    print(f"online idle          randread-4k QD16 {iops0:9.0f} IOPS  seq-read {mib0:7.1f} MiB/s")
    print(f"online reencrypting  randread-4k QD16 {iops1:9.0f} IOPS  seq-read {mib1:7.1f} MiB/s"
          f"  kept {iops1 / iops0:.2f} / {mib1 / mib0:.2f} (over {took:.1f} s at the default "
          "rate)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB of data (default 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        tmp = Path(d)
        vol, pw = make_volume(tmp, size)
        offline(tmp, vol, pw, args.rounds, size)
        online(tmp, vol, pw, size)


if __name__ == "__main__":
    main()
