"""`serve --reencrypt`: the volume key rotated while a client reads and
writes, the server killed -9 at random moments and started again; every
acknowledged write survives, the key changes, cryptsetup agrees at the end."""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from nbdluks.manage import ReencryptOptions, Target, run_beside
from nbdluks.unlock import UnlockOptions, VolumeConfig, VolumeOptions, open_volume
from tests.conftest import Upstream, free_port, pattern, run
from tests.luks.reference import crypt, dump_offset, fill, luks_format
from tests.luks.test_reencryption import volume_key
from tests.manage.conftest import MiB
from tests.manage.test_reencrypt import final_plaintext, made_with_data
from tests.rawnbd import raw_connect, recv_exact, request, simple_reply

READ, WRITE, FLUSH = 0, 1, 3
BLOCK = 4096


def serve(made_payload: Path, sock: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    if sock.exists():
        sock.unlink()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdluks", "serve", "--payload", str(made_payload),
             "--key-file", str(made_payload.with_suffix(".pass")), "-k", str(sock),
             "--reencrypt", "--log-format", "json", "--log-level", "debug", *extra],
            stdout=f, stderr=subprocess.STDOUT)
    while not sock.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)
    return proc


class Writer:
    """Writes random chunks, each flushed before it counts as acknowledged;
    the one in flight when the server dies is checked at the next start
    (each block old or new, nothing else)."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.expected = bytearray(data)
        self.rng = random.Random(seed)
        self.in_flight: tuple[int, bytes, bytes] | None = None
        self.acked = 0

    def settle(self, s: object) -> None:
        if self.in_flight is None:
            return
        off, old, new = self.in_flight
        request(s, READ, 1, off, len(old))  # type: ignore[arg-type]
        assert simple_reply(s)[0] == 0  # type: ignore[arg-type]
        got = recv_exact(s, len(old))  # type: ignore[arg-type]
        for b in range(0, len(old), BLOCK):
            assert got[b : b + BLOCK] in (old[b : b + BLOCK], new[b : b + BLOCK]), off + b
        self.expected[off : off + len(old)] = got
        self.in_flight = None

    def write_until_gone(self, sock: Path, killed: threading.Event) -> None:
        """Until the connection ends; or until a request fails once the
        server is killed: its workers drain what they read, and the zone
        whose step the kill cut short answers EIO (the write is in flight)."""
        try:
            s = raw_connect(str(sock))
            self.settle(s)
            while True:
                n = self.rng.choice([BLOCK, 2 * BLOCK, 64 * 1024, 512 * 1024])
                off = self.rng.randrange(0, len(self.expected) - n) // BLOCK * BLOCK
                new = os.urandom(n)
                self.in_flight = (off, bytes(self.expected[off : off + n]), new)
                request(s, WRITE, 2, off, n, payload=new)
                if (error := simple_reply(s)[0]) != 0:
                    assert killed.is_set(), f"error {error} from a server not killed"
                    return
                request(s, FLUSH, 3, 0, 0)
                if (error := simple_reply(s)[0]) != 0:
                    assert killed.is_set(), f"error {error} from a server not killed"
                    return
                self.expected[off : off + n] = new
                self.in_flight = None
                self.acked += 1
        except (ConnectionError, OSError):
            return  # the server was killed


def test_killed_again_and_again_while_reencrypting_and_written(tmp_path: Path) -> None:
    made, data = made_with_data(tmp_path)
    writer = Writer(data, seed=5)
    rng = random.Random(9)
    sock, kills = tmp_path / "sock", 0
    for r in range(20):
        proc = serve(made.payload, sock, tmp_path / f"log{r}", "--reencrypt-rate", "12",
                     "--hotzone-size", "256K")
        killed = threading.Event()

        def kill(proc: subprocess.Popen[bytes] = proc, killed: threading.Event = killed) -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(rng.uniform(0.3, 1.2), kill)
        timer.start()
        writer.write_until_gone(sock, killed)
        timer.join()
        assert proc.wait(30) == -signal.SIGKILL
        kills += 1
        if "online-reencrypt" not in run(["cryptsetup", "luksDump", str(made.payload)]).stdout:
            break
    # one more start: whatever the last kill interrupted is recovered
    proc = serve(made.payload, sock, tmp_path / "last")
    s = raw_connect(str(sock))
    writer.settle(s)
    s.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    if "online-reencrypt" in run(["cryptsetup", "luksDump", str(made.payload)]).stdout:
        subprocess.run([sys.executable, "-m", "nbdluks", "reencrypt", "--resume-only",
                        "--payload", str(made.payload), "--key-file",
                        str(made.payload.with_suffix(".pass"))], check=True,
                       capture_output=True)
    key, plain = final_plaintext(made, len(data))
    assert key != made.key
    assert plain == bytes(writer.expected), f"after {kills} kills, {writer.acked} writes"
    assert kills >= 3 and writer.acked > 100


def test_clients_read_the_same_bytes_throughout_and_a_stop_exits_0(tmp_path: Path) -> None:
    made, data = made_with_data(tmp_path)
    sock = tmp_path / "sock"
    port = free_port()
    proc = serve(made.payload, sock, tmp_path / "log", "--reencrypt-rate", "8",
                 "--hotzone-size", "256K", "--metrics", str(port))
    uri = f"nbd+unix:///?socket={sock}"
    seen = []
    for i in range(6):  # the boundary moves between (and during) the copies
        run(["nbdcopy", uri, str(tmp_path / f"copy{i}")])
        assert (tmp_path / f"copy{i}").read_bytes() == data
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        done = re.search(rb"^nbdluks_reencryption_bytes_done (\d+)", text, re.M)
        assert done and f"nbdluks_reencryption_bytes_total {len(data)}".encode() in text
        seen.append(int(done.group(1)))
    assert seen == sorted(seen) and 0 < seen[-1] <= len(data)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    log = (tmp_path / "log").read_text()
    assert "reencryption stopped" in log or "reencryption finished" in log
    subprocess.run([sys.executable, "-m", "nbdluks", "reencrypt", "--resume-only", "--payload",
                    str(made.payload), "--key-file", str(made.payload.with_suffix(".pass"))],
                   capture_output=True)
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and plain == data


def forked_by_a_threadless_helper(log: Path, server: int) -> None:
    """The reencrypting process was forked by the rotator's helper, which
    never starts a thread: not by the server, whose unlock ran threads (an
    NBD source's connection; Tang's requests), one of which may have held a
    lock at the fork that nothing in the child would ever release. (Reaped
    by the helper once done: then gone, where the server's child would stay
    a zombie until the server stops.)"""
    deadline = time.monotonic() + 60
    while '"reencryption running beside the server"' not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    (line,) = [json.loads(t) for t in log.read_text().splitlines()
               if '"reencryption running beside the server"' in t]
    try:
        status = Path(f"/proc/{line['pid']}/status").read_text()
        parent = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        threads = re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{parent}/status").read_text(),
                            re.M)
    except (FileNotFoundError, ProcessLookupError):
        return  # ended and reaped (by the helper: the server reaps its children at its stop)
    assert parent != server and threads and threads.group(1) == "1"
    assert "forked from a threaded process" not in log.read_text()


def test_header_and_payload_on_nbd_servers(tmp_path: Path, upstreams: list[Upstream]) -> None:
    """serve --reencrypt with the detached header behind nbdkit and the
    payload behind qemu-nbd: reads byte-exact throughout, a client's write
    lands, the reencryption finishes over NBD alone."""
    made, data = made_with_data(tmp_path, detached=True)
    assert made.header is not None
    hdr = Upstream("nbdkit", made.header, tmp_path, tcp=False)
    pay = Upstream("qemu-nbd", made.payload, tmp_path, tcp=False)
    upstreams += [hdr, pay]
    sock = tmp_path / "sock"
    log = tmp_path / "log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdluks", "serve", "--header", hdr.uri, "--payload", pay.uri,
             "--key-file", str(made.payload.with_suffix(".pass")), "-k", str(sock),
             "--reencrypt", "--reencrypt-rate", "16", "--hotzone-size", "1M",
             "--log-format", "json", "--log-level", "debug"], stdout=f, stderr=subprocess.STDOUT)
    while not sock.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)
    try:
        forked_by_a_threadless_helper(log, proc.pid)
        uri = f"nbd+unix:///?socket={sock}"
        edit = os.urandom(3 * BLOCK * 100)
        s = raw_connect(str(sock))
        request(s, WRITE, 1, 5 * BLOCK * 100, len(edit), payload=edit)
        assert simple_reply(s)[0] == 0
        request(s, FLUSH, 2, 0, 0)
        assert simple_reply(s)[0] == 0
        s.close()
        expected = bytearray(data)
        expected[5 * BLOCK * 100 : 5 * BLOCK * 100 + len(edit)] = edit
        deadline = time.monotonic() + 120
        while "reencryption finished" not in (text := log.read_text()):
            assert '"reencryption failed' not in text, text[text.index('"reencryption failed'):]
            run(["nbdcopy", uri, str(tmp_path / "copy")])
            assert (tmp_path / "copy").read_bytes() == expected
            assert time.monotonic() < deadline, text[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    for u in (hdr, pay):
        u.stop()
    key = volume_key(made.header, made.payload.with_suffix(".pass"))
    offset, ss = dump_offset(made.header)
    assert key != made.key
    with open(made.payload, "rb") as f:
        f.seek(offset)
        assert crypt(f.read(len(data)), made.cipher, key, ss, encrypt=False) == bytes(expected)


class StarvedClock:
    """The time a process starved of CPU sees (two busy cores' worth of
    other work): every read of the clock finds it moved on by a random
    slice, as if the process had been descheduled since the last read; a
    sleep moves it by what was asked. Virtual, so the interleaving is the
    seed's, not the machine's."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 1000.0

    def monotonic(self) -> float:
        self.now += self.rng.uniform(0.0, 0.02)
        return self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, 0.0))  # time.sleep's own check: a negative length raises
        self.now += seconds


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_rate_limit_survives_a_starved_cpu(tmp_path: Path, seed: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: the wait between two steps read the clock twice, and a
    process descheduled between the reads asked to sleep a negative time;
    the ValueError ended the reencryption while the server served on (no
    step for minutes). With the clock of a starved process, every step is
    done, the rate is kept, and the volume is rotated."""
    made = luks_format(tmp_path, name="r", size=20 * MiB)  # 4 MiB of data
    plain = pattern(4 * MiB, seed=seed)
    fill(made, plain)
    key_file = str(tmp_path / "r.pass")
    run([sys.executable, "-m", "nbdluks", "reencrypt", "--init-only", "--payload",
         str(made.payload), "--key-file", key_file])
    opened = open_volume(VolumeConfig(name="r", payload=str(made.payload),
                                      keys=UnlockOptions(key_file=key_file),
                                      options=VolumeOptions(reencrypting=True)))
    clock = StarvedClock(seed)
    # (the module: the package's `reencrypt` is the function of that name)
    monkeypatch.setattr(importlib.import_module("nbdluks.manage.reencrypt"), "time", clock)
    rate = 1.0 * MiB  # a 64 KiB step every 62.5 ms: waits between most steps
    try:
        began = clock.now
        status = run_beside(Target(str(made.payload), opened.config.options.upstream),
                            str(made.payload), opened.template,
                            ReencryptOptions(hotzone_size=64 * 1024), rate)
    finally:
        opened.close()
    assert status == 0
    assert clock.now - began >= len(plain) / rate
    key, got = final_plaintext(made, len(plain))
    assert key != made.key and got == plain
