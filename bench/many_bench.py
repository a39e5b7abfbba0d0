"""Memory per volume: one nbdluks server with N LUKS1 exports next to
qemu-storage-daemon with the same N exports, in the same run; prints the
PSS (summed over each server's processes) for N = 1, 100, 1000, the slope
(KiB per extra volume), and how long nbdluks took to list them.

    python -m bench.many_bench [--counts 1,100,1000] [--processes N]

The volumes are copies of one LUKS1 aes-xts volume made by cryptsetup with a
fast PBKDF2 (the memory of an open volume does not depend on its KDF).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.server_bench import wait_socket

MiB = 1 << 20


def pss_kib(pid: int) -> int:
    """PSS of `pid` and its descendants, KiB."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        pids += [int(k) for k in kids]
    return total


def make_volumes(tmp: Path, n: int) -> tuple[list[Path], Path]:
    pw = tmp / "pw"
    pw.write_bytes(b"benchmark passphrase")
    first = tmp / "v0.img"
    with open(first, "wb") as f:
        f.truncate(4 * MiB)
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks1",
                    "--pbkdf-force-iterations", "1000", "--key-file", str(pw), str(first)],
                   check=True)
    vols = [first]
    for i in range(1, n):
        p = tmp / f"v{i}.img"
        shutil.copyfile(first, p)
        vols.append(p)
    return vols, pw


def settle(pid: int) -> int:
    """PSS once it stops moving (workers forked, buffers touched)."""
    last = -1
    for _ in range(20):
        time.sleep(1)
        now = pss_kib(pid)
        if abs(now - last) < 64:
            return now
        last = now
    return last


def nbdluks(tmp: Path, vols: list[Path], pw: Path, processes: int | None) -> tuple[int, float]:
    cfg = tmp / "exports.toml"
    sock = tmp / "nbdluks.sock"
    with open(cfg, "w") as f:
        f.write(f'[server]\nsocket = "{sock}"\n')
        if processes:
            f.write(f"processes = {processes}\n")
        for i, v in enumerate(vols):
            f.write(f'[exports.v{i}]\npayload = "{v}"\nkey-file = "{pw}"\n')
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "nbdluks", "serve", "--config", str(cfg),
                             "--log-level", "warning"], stderr=subprocess.DEVNULL)
    try:
        wait_socket(str(sock), proc, timeout=600)
        # listening starts at once: the exports are listed as they unlock
        while True:
            listed = subprocess.run(["nbdinfo", "--list", f"nbd+unix:///?socket={sock}"],
                                    capture_output=True, text=True, check=True).stdout
            took = time.monotonic() - started
            if listed.count("export=") == len(vols):
                break
            assert took < 600 and proc.poll() is None, listed[:200]
            time.sleep(0.1)
        return settle(proc.pid), took
    finally:
        proc.terminate()
        proc.wait(60)


def qsd(tmp: Path, vols: list[Path], pw: Path) -> int:
    sock = tmp / "qsd.sock"
    cmd = ["qemu-storage-daemon", "--object", f"secret,id=s0,file={pw}",
           "--nbd-server", f"addr.type=unix,addr.path={sock}"]
    for i, v in enumerate(vols):
        cmd += ["--blockdev", f"driver=file,node-name=f{i},filename={v}",
                "--blockdev", f"driver=luks,node-name=l{i},file=f{i},key-secret=s0",
                "--export", f"type=nbd,id=e{i},node-name=l{i},name=v{i},writable=on"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        wait_socket(str(sock), proc, timeout=600)
        return settle(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,100,1000")
    ap.add_argument("--processes", type=int, default=None,
                    help="nbdluks worker processes (default: its own default)")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        tmp = Path(d)
        vols, pw = make_volumes(tmp, max(counts))
        rows = []
        for n in counts:
            ours, took = nbdluks(tmp, vols[:n], pw, args.processes)
            theirs = qsd(tmp, vols[:n], pw)
            rows.append((n, ours, theirs, took))
            print(f"  {n:5d} volumes: nbdluks {ours / 1024:8.1f} MiB (listed in {took:5.1f} s)"
                  f"   qemu-storage-daemon {theirs / 1024:8.1f} MiB", flush=True)
    (n0, o0, t0, _), (n1, o1, t1, _) = rows[0], rows[-1]
    print(f"\nper extra volume: nbdluks {(o1 - o0) / (n1 - n0):.0f} KiB, "
          f"qemu-storage-daemon {(t1 - t0) / (n1 - n0):.0f} KiB (PSS over all processes)")


if __name__ == "__main__":
    main()
