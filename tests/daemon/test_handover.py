"""Exports unlock on their own while the workers already serve (volumes
handed to running workers): with real clients, the fast exports are served
while a slow one waits for its key, a client asking for the slow one gets it
once ready, one asking for a failing one gets a clean error, one waiting past
the handshake limit is closed; an export added by SIGHUP is waited for, not
"unknown". The slow keys are FIFOs the test writes when it chooses."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdluks.daemon import handover
from nbdluks.unlock import UnlockOptions, VolumeConfig, VolumeOptions, open_volume
from tests.conftest import SYSTEM_PYTHON, Served, log_events, need, pattern
from tests.daemon.test_many import LOOP, READER, digests, listed, read, wait_for
from tests.luks.reference import Made, fill, luks_format

MiB = 1 << 20
pytestmark = pytest.mark.slow


def volume(tmp: Path, name: str, version: int = 1) -> tuple[Made, bytes]:
    made = luks_format(tmp, name=name, version=version, size=4 * MiB, detached=version == 2,
                       passphrase=f"passphrase {name}".encode())
    plain = pattern(made.payload.stat().st_size - made.offset, seed=len(name) + version)
    fill(made, plain)
    return made, plain


def table(name: str, made: Made, key: Path) -> str:
    out = f'[exports.{name}]\npayload = "{made.payload}"\nkey-file = "{key}"\n'
    return out + (f'header = "{made.header}"\n' if made.header else "")


def fifo(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.fifo"
    os.mkfifo(path)
    return path


def feed(path: Path, data: bytes) -> threading.Thread:
    """Write `data` into a FIFO once the server opens it (on a thread: the
    open waits for the reader)."""
    def write() -> None:
        with open(path, "wb") as f:
            f.write(data)
    t = threading.Thread(target=write, daemon=True)
    t.start()
    return t


def client(served: Served, name: str) -> subprocess.Popen[str]:
    """A reader of `name`'s first and last MiB (one JSON line), started now."""
    return subprocess.Popen([SYSTEM_PYTHON, "-c", READER, str(served.socket), name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LIBNBD_DEBUG": "1"})


def still_waiting(proc: subprocess.Popen[str], seconds: float = 1.0) -> bool:
    time.sleep(seconds)
    return proc.poll() is None


def test_each_export_is_served_when_it_is_ready(nbdluks: Callable[..., Served],
                                                 tmp_path: Path) -> None:
    need("cryptsetup", "nbdinfo")
    fast = [volume(tmp_path, f"f{i}") for i in range(3)]
    slow, slow_plain = volume(tmp_path, "slow", version=2)
    bad, _ = volume(tmp_path, "bad", version=2)
    keys = {name: fifo(tmp_path, name) for name in ("slow", "bad", "never")}
    cfg = tmp_path / "exports.toml"
    cfg.write_text("[server]\nprocesses = 2\n\n" + "".join(
        table(f"f{i}", m, m.payload.parent / f"f{i}.pass") for i, (m, _) in enumerate(fast))
        + table("slow", slow, keys["slow"]) + table("bad", bad, keys["bad"])
        + table("never", fast[0][0], keys["never"]))
    served = nbdluks("--config", str(cfg), "--handshake-limit", "5")
    try:
        # the fast ones are listed and read while three keys are still awaited
        wait_for(lambda: [n for n, _ in listed(served)] == ["f0", "f1", "f2"], timeout=60)
        got = read(served, ["f0", "f1", "f2"])
        for i, (_, plain) in enumerate(fast):
            assert got[f"f{i}"] == digests(plain)
        assert not log_events(served.log_text(), "exports ready")

        # a client asking for one still unlocking waits, and gets it once ready
        waiting = client(served, "slow")
        never = subprocess.Popen(["nbdinfo", "--size",
                                  f"nbd+unix:///never?socket={served.socket}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        never_started = time.monotonic()
        assert still_waiting(waiting)
        feed(keys["slow"], b"passphrase slow")
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err[-2000:]
        assert json.loads(out) == {"slow": digests(slow_plain)}

        # one asking for an export that fails to unlock gets a clean error
        failing = client(served, "bad")
        assert still_waiting(failing)
        feed(keys["bad"], b"not the passphrase")
        _, err = failing.communicate(timeout=60)
        assert failing.returncode != 0
        assert "export 'bad' could not be opened" in err
        failed = log_events(served.log_text(), "export not served")
        assert [(e["export"], e["kind"]) for e in failed] == [("bad", "WrongKeyError")]

        # one waiting past the handshake limit is closed
        assert never.wait(60) != 0
        assert time.monotonic() - never_started >= 4.5
        timed_out = log_events(served.log_text(), "negotiation timed out")
        assert [e["waiting_for"] for e in timed_out] == ["never"]
        assert [n for n, _ in listed(served)] == ["f0", "f1", "f2", "slow"]
    finally:
        feed(keys["never"], b"passphrase f0")
    wait_for(lambda: bool(log_events(served.log_text(), "exports ready")), timeout=60)
    assert [n for n, _ in listed(served)] == ["f0", "f1", "f2", "slow", "never"]
    assert served.stop() == 0


def test_an_export_added_by_a_reload_is_waited_for(nbdluks: Callable[..., Served],
                                                    tmp_path: Path) -> None:
    need("cryptsetup", "nbdinfo")
    first, first_plain = volume(tmp_path, "first")
    late, late_plain = volume(tmp_path, "late", version=2)
    key = fifo(tmp_path, "late")
    cfg = tmp_path / "exports.toml"
    cfg.write_text("[server]\nprocesses = 2\n\n"
                   + table("first", first, first.payload.parent / "first.pass"))
    served = nbdluks("--config", str(cfg))
    wait_for(lambda: bool(log_events(served.log_text(), "exports ready")), timeout=60)
    reader = subprocess.Popen(  # reads "first" across the reload
        [SYSTEM_PYTHON, "-c", LOOP, str(served.socket), "first", str(tmp_path / "stop")],
        stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "connected"
    cfg.write_text(cfg.read_text() + table("late", late, key))
    served.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: bool(log_events(served.log_text(), "configuration reloading")))
    waiting = client(served, "late")
    assert still_waiting(waiting)  # not "unknown export": it is coming
    feed(key, b"passphrase late")
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err[-2000:]
    assert json.loads(out) == {"late": digests(late_plain)}
    wait_for(lambda: bool(log_events(served.log_text(), "configuration reloaded")))
    (event,) = log_events(served.log_text(), "configuration reloaded")
    assert event["added"] == ["late"] and event["retired"] == []
    assert [n for n, _ in listed(served)] == ["first", "late"]
    assert read(served, ["first"])["first"] == digests(first_plain)
    (tmp_path / "stop").touch()
    out, _ = reader.communicate(timeout=60)
    assert out.split()[-2:] == ["errors", "0"], out
    assert served.stop() == 0



def test_a_volume_handed_over_reads_the_same_its_key_beside_the_pickle(
        tmp_path: Path) -> None:
    """What a running worker receives: the device serves the same bytes,
    sealed; the key is not in the pickle but an out-of-band buffer; the
    payload and the range lock travel as descriptors."""
    need("cryptsetup")
    made, plain = volume(tmp_path, "h")
    key = (tmp_path / "h.vk").read_bytes()
    opened = open_volume(VolumeConfig(name="h", payload=str(made.payload), keys=UnlockOptions(
        key_file=str(tmp_path / "h.pass"))))
    try:
        opened.before_fork()
        fds: list[int] = []
        buffers: list[pickle.PickleBuffer] = []
        stream = io.BytesIO()
        handover._Pickler(stream, fds, buffers).dump(opened)
        assert key not in stream.getvalue()
        assert [bytes(b.raw()) for b in buffers] == [key]
        assert len(fds) == 2  # the payload, the range lock's memfd
        parent, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with parent, worker:
            handover.send_volume(parent, opened, {"name": "h"})
            tag, passed, _, _ = socket.recv_fds(worker, 16, 16)
            assert tag == handover.VOLUME and len(passed) == 1
            with socket.socket(fileno=passed[0]) as sock:
                meta, got = handover.receive_volume(sock)
    finally:
        opened.close()
    assert meta == {"name": "h"} and not isinstance(got, Exception)
    received, device = got
    try:
        assert received.name == "h" and device.size == len(plain)
        buf = bytearray(MiB)
        device.pread_into(memoryview(buf), device.size - MiB)
        assert buf == plain[-MiB:]
        with pytest.raises(OSError):
            device.reopen()  # sealed: no key kept beyond the cipher's
    finally:
        device.close()


def test_a_volume_whose_key_rotates_is_handed_over_with_its_boundary(tmp_path: Path) -> None:
    """A RotatingDevice handed to a worker shares the boundary and the zone
    lock with the parent's (memfds beside the pickle): a step published in
    the parent moves what the worker reads, both keys travel out of band."""
    need("cryptsetup")
    made = luks_format(tmp_path, name="r", size=20 * MiB)  # LUKS2, attached
    plain = pattern(4 * MiB, seed=3)
    fill(made, plain)
    subprocess.run([sys.executable, "-m", "nbdluks", "reencrypt", "--init-only", "--payload",
                    str(made.payload), "--key-file", str(tmp_path / "r.pass")], check=True,
                   capture_output=True)
    opened = open_volume(VolumeConfig(
        name="r", payload=str(made.payload), keys=UnlockOptions(key_file=str(tmp_path / "r.pass")),
        options=VolumeOptions(reencrypting=True)))
    try:
        opened.before_fork()
        parent, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with parent, worker:
            handover.send_volume(parent, opened, {"name": "r"})
            _, passed, _, _ = socket.recv_fds(worker, 16, 16)
            with socket.socket(fileno=passed[0]) as sock:
                _, got = handover.receive_volume(sock)
        assert not isinstance(got, Exception)
        _, device = got
        template = opened.template
        assert template is not None
        try:
            buf = bytearray(MiB)
            device.pread_into(memoryview(buf), 0)
            assert buf == plain[:MiB]
            # a step the parent's side publishes is what the worker's side sees
            template.boundary.publish(0, 0, MiB)  # type: ignore[attr-defined]
            with pytest.raises(OSError):
                device.pread_into(memoryview(buf), 0)  # that zone's step "never finished"
            template.boundary.publish(0)  # type: ignore[attr-defined]
            device.pread_into(memoryview(buf), 0)
            assert buf == plain[:MiB]
        finally:
            device.close()
    finally:
        opened.close()
