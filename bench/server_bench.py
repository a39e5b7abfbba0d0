"""Throughput of nbdluks next to nbdkit and qemu-nbd, in one run, on the same
data, alternating the servers each round; prints ratios (nbdluks / peer,
higher is better for nbdluks).

    python -m bench.server_bench raw   [--size-mib 1024] [--rounds 3] [--baseline DIR]
    python -m bench.server_bench luks  [--size-mib 1024] [--rounds 3] [--baseline DIR]

--baseline DIR adds nbdluks from another checkout (e.g. a `git worktree` of
the commit before a change, its C helper built) as one more server,
"baseline": an A/B of a change in the same run.

raw:  a plain file through `nbdluks serve --raw`, nbdkit's file plugin and
      qemu-nbd -f raw.
luks: a LUKS1 aes-xts-plain64 volume through nbdluks, nbdkit's luks filter
      and qemu-nbd's luks driver; plus a LUKS2 4096-byte-sector volume
      through nbdluks (nobody else opens LUKS2).

Workloads: sequential read (nbdcopy --no-extents to null:), sequential write
(nbdcopy from a file; luks only), 4 KiB random read (fio's nbd engine,
iodepth 16, 10 s) over 1, 4 and 16 connections and, luks only, the latency
of 4 KiB random reads one at a time (iodepth 1, 5 s: p50 and p99 in
microseconds).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.luks.reference import qemu_luks_create

MiB = 1 << 20


def wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.args}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server did not start: {proc.args}")


class Server:
    def __init__(self, name: str, cmd: list[str], sock: str,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.sock, self.env = name, cmd, sock, env

    def __enter__(self) -> Server:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=self.env)
        wait_socket(self.sock, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def seq_read(uri: str, size: int) -> float:
    return size / MiB / timed(["nbdcopy", "--no-extents", uri, "null:"])


def seq_write(uri: str, src: str, size: int) -> float:
    return size / MiB / timed(["nbdcopy", "--no-extents", "--allocated", src, uri])


def rand_read(uri: str, size: int, connections: int = 1) -> float:
    """4 KiB random reads, 16 in flight per connection: IOPS of them all."""
    out = subprocess.run(
        ["fio", "--name=r", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
         "--iodepth=16", f"--size={size}", "--runtime=10", "--time_based",
         f"--numjobs={connections}", "--group_reporting", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    return float(json.loads(out[out.index("{"):])["jobs"][0]["read"]["iops"])


def rand_read_workloads(size: int) -> dict[str, Callable[[str], float]]:
    """One connection, 4 (nbdcopy's default) and 16."""
    return {"randread-4k": lambda u: rand_read(u, size),
            "randread-4k-4c": lambda u: rand_read(u, size, 4),
            "randread-4k-16c": lambda u: rand_read(u, size, 16)}


def qd1_latency(uri: str, size: int) -> tuple[float, float]:
    """4 KiB random reads one at a time: completion latency p50, p99 (us)."""
    out = subprocess.run(
        ["fio", "--name=r", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
         "--iodepth=1", f"--size={size}", "--runtime=5", "--time_based",
         "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    pct = json.loads(out[out.index("{"):])["jobs"][0]["read"]["clat_ns"]["percentile"]
    return pct["50.000000"] / 1000, pct["99.000000"] / 1000


def latency_workloads(size: int) -> dict[str, Callable[[str], float]]:
    """p50 and p99 from one fio run per server and round."""
    last: dict[str, tuple[float, float]] = {}

    def p50(uri: str) -> float:
        last[uri] = qd1_latency(uri, size)
        return last[uri][0]

    return {"qd1-p50": p50, "qd1-p99": lambda uri: last[uri][1]}


def run_rounds(servers: list[Callable[[], Server]], workloads: dict[str, Callable[[str], float]],
               rounds: int) -> dict[str, dict[str, list[float]]]:
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        order = servers if r % 2 == 0 else list(reversed(servers))
        for make in order:
            with make() as srv:
                for wname, fn in workloads.items():
                    v = fn(srv.uri)
                    results.setdefault(wname, {}).setdefault(srv.name, []).append(v)
                    print(f"  round {r + 1} {srv.name:9s} {wname:12s} {v:10.1f}", flush=True)
    return results


def report(results: dict[str, dict[str, list[float]]], units: dict[str, str]) -> None:
    """Ratios are nbdluks / server for rates, server / nbdluks for latencies
    (us): above 1 is better for nbdluks either way."""
    print()
    print(f"{'workload':14s} {'server':10s} {'median':>10s}  ratio (>1: nbdluks better)")
    for wname, per in results.items():
        ours = statistics.median(per["nbdluks"])
        for name, vals in per.items():
            med = statistics.median(vals)
            r = med / ours if units[wname] == "us" else ours / med
            ratio = "" if name == "nbdluks" else f"{r:.2f}"
            print(f"{wname:14s} {name:10s} {med:10.1f} {units[wname]:6s} {ratio}")


def nbdluks_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nbdluks", "serve", *args, "--log-level", "warning"]


def with_baseline(servers: list[Callable[[], Server]], baseline: str | None
                  ) -> list[Callable[[], Server]]:
    """The first server (nbdluks) once more, run from the checkout `baseline`."""
    if baseline is None:
        return servers
    env = {**os.environ, "PYTHONPATH": os.path.abspath(baseline)}

    def make() -> Server:
        ours = servers[0]()
        return Server("baseline", ours.cmd, ours.sock, env)

    return [*servers, make]


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))


def bench_raw(tmp: Path, size: int, rounds: int, baseline: str | None) -> None:
    img = tmp / "disk.img"
    random_file(img, size)
    s = str(tmp / "s.sock")
    servers = [
        lambda: Server("nbdluks", nbdluks_cmd("--raw", str(img), "-k", s), s),
        lambda: Server("nbdkit", ["nbdkit", "-f", "-U", s, "file", f"file={img}"], s),
        lambda: Server("qemu-nbd", ["qemu-nbd", "-t", "-f", "raw", "--shared=8", "-k", s,
                                    str(img)], s),
    ]
    workloads = {"seq-read": lambda u: seq_read(u, size), **rand_read_workloads(size)}
    res = run_rounds(with_baseline(servers, baseline), workloads, rounds)
    report(res, {"seq-read": "MiB/s", **dict.fromkeys(rand_read_workloads(size), "IOPS")})


def bench_luks(tmp: Path, size: int, rounds: int, baseline: str | None) -> None:
    pw = tmp / "pw"
    pw.write_bytes(b"benchmark passphrase")
    img = tmp / "v1.luks"
    qemu_luks_create(img, pw, size, "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,"
                     "hash-alg=sha256")
    # Allocate the payload now, so that no server pays for it in its first round.
    with open(img, "r+b") as f:
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    src = tmp / "src.raw"
    random_file(src, size)
    s = str(tmp / "s.sock")
    servers = [
        lambda: Server("nbdluks", nbdluks_cmd("--payload", str(img), "--key-file", str(pw),
                                              "-k", s), s),
        lambda: Server("nbdkit", ["nbdkit", "-f", "-U", s, "--filter=luks", "file",
                                  f"file={img}", f"passphrase=+{pw}"], s),
        lambda: Server("qemu-nbd", ["qemu-nbd", "-t", "--shared=8", "-k", s, "--object",
                                    f"secret,id=s0,file={pw}", "--image-opts",
                                    f"driver=luks,key-secret=s0,file.filename={img}"], s),
    ]
    workloads = {"seq-write": lambda u: seq_write(u, str(src), size),
                 "seq-read": lambda u: seq_read(u, size),
                 **rand_read_workloads(size),
                 **latency_workloads(size)}
    res = run_rounds(with_baseline(servers, baseline), workloads, rounds)
    report(res, {"seq-read": "MiB/s", "seq-write": "MiB/s",
                 **dict.fromkeys(rand_read_workloads(size), "IOPS"),
                 "qd1-p50": "us", "qd1-p99": "us"})
    # LUKS2, 4096-byte sectors: nbdluks alone (and its baseline)
    hdr, pay = tmp / "v2.hdr", tmp / "v2.payload"
    with open(hdr, "wb") as f:
        f.truncate(16 * MiB)
    random_file(pay, size)
    subprocess.run(["cryptsetup", "luksFormat", "-q", "--type", "luks2", "--sector-size",
                    "4096", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                    "--header", str(hdr), "--key-file", str(pw), str(pay)], check=True)
    luks2 = [lambda: Server("nbdluks", nbdluks_cmd("--payload", str(pay), "--header", str(hdr),
                                                    "--key-file", str(pw), "-k", s), s)]
    res = run_rounds(with_baseline(luks2, baseline),
                     {"luks2-4k-read": lambda u: seq_read(u, size)}, rounds)
    report(res, {"luks2-4k-read": "MiB/s"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("raw", "luks"))
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="DIR", help="nbdluks from this checkout too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR", "/var/tmp")) as d:
        size = args.size_mib * MiB
        if args.what == "raw":
            bench_raw(Path(d), size, args.rounds, args.baseline)
        else:
            bench_luks(Path(d), size, args.rounds, args.baseline)


if __name__ == "__main__":
    main()
