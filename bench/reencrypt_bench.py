"""Rotating a volume key: how fast, and what clients keep meanwhile.

    python -m bench.reencrypt_bench [--size MiB] [--rounds N]
    python -m bench.reencrypt_bench --neighbour [--size MiB] [--rate MiB/s] [--rounds N]

Offline: `cryptsetup reencrypt --force-offline-reencrypt` and `nbdluks
reencrypt` on copies of one LUKS2 volume (aes-xts-plain64, 4096-byte
sectors, made by cryptsetup), resilience checksum and none, each with its
default hotzone; MiB/s and nbdluks/cryptsetup. Online: 4 KiB random reads
(fio, QD16) and a sequential read (nbdcopy) of the volume served by
nbdluks, idle and during `serve --reencrypt` at its default rate; the
ratio is what clients keep. Neighbour: a `serve --config` server of two
volumes; 4 KiB random reads (fio, QD16) of the one not marked, while the
other is idle and while it is reencrypted at --rate (alternating rounds,
medians): what one volume's rotation costs the others.
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


def neighbour(tmp: Path, size: int, rate: float, rounds: int) -> None:
    (tmp / "q").mkdir()
    (tmp / "b").mkdir()
    quiet, pw = make_volume(tmp / "q", 256 * MiB)
    busy, _ = make_volume(tmp / "b", size)
    copy, cfg, s = tmp / "busy.luks", tmp / "exports.toml", str(tmp / "n.sock")
    iops: dict[str, list[float]] = {"idle": [], "reencrypting": []}
    for _ in range(rounds):
        for label in iops:
            shutil.copyfile(busy, copy)
            mark = f"reencrypt = true\nreencrypt-rate = {rate:g}\n" if label != "idle" else ""
            cfg.write_text(f'[exports.quiet]\npayload = "{quiet}"\nkey-file = "{pw}"\n'
                           f'[exports.busy]\npayload = "{copy}"\nkey-file = "{pw}"\n{mark}')
            with Server(label, nbdluks_cmd("--config", str(cfg), "-k", s), s):
                time.sleep(1.0)  # both exports unlocked, the reencryption under way
                iops[label].append(rand_read(f"nbd+unix:///quiet?socket={s}", 256 * MiB))
            dump = subprocess.run(["cryptsetup", "luksDump", str(copy)], check=True,
                                  capture_output=True, text=True).stdout
            if label != "idle" and "online-reencrypt" not in dump:
                print("(the reencryption finished before the measurement did: use a larger "
                      "--size)")
    idle, busy_iops = (statistics.median(iops[k]) for k in ("idle", "reencrypting"))
    print(f"neighbour idle          randread-4k QD16 {idle:9.0f} IOPS  "
          f"(runs {', '.join(f'{v:.0f}' for v in iops['idle'])})")
    print(f"neighbour reencrypting  randread-4k QD16 {busy_iops:9.0f} IOPS  "
          f"(runs {', '.join(f'{v:.0f}' for v in iops['reencrypting'])})  "
          f"kept {busy_iops / idle:.2f} (the other export at {rate:g} MiB/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB of data (default 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--neighbour", action="store_true",
                    help="only the cost of one export's reencryption to another's reads")
    ap.add_argument("--rate", type=float, default=64.0, help="--neighbour: MiB/s (default 64)")
    args = ap.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        tmp = Path(d)
        if args.neighbour:
            neighbour(tmp, size, args.rate, args.rounds)
            return
        vol, pw = make_volume(tmp, size)
        offline(tmp, vol, pw, args.rounds, size)
        online(tmp, vol, pw, size)


if __name__ == "__main__":
    main()
