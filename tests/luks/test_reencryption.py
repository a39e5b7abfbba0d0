"""Volumes in the middle of a cryptsetup reencryption (interrupted by a
signal, or killed and recovered by `cryptsetup repair`) are served byte
for byte, read-write; cryptsetup then finishes them, and an independent
reader with the final key finds every byte the clients wrote."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import libnbd, need, pattern, run
from tests.luks.reference import Made, crypt, fill, luks_format

MiB = 1 << 20
SIZE = 48 * MiB  # 32 MiB of data: cryptsetup takes ~1 s with 64 KiB hotzones
DELAYS = {"checksum": (0.5, 0.3, 0.7, 0.2), "journal": (0.5, 0.3, 0.7, 0.2),
          "none": (0.1, 0.05, 0.15, 0.03)}


def interrupted(made: Made, resilience: str, delay: float, sig: int) -> bool:
    """Start `cryptsetup reencrypt` and stop it with `sig` after `delay`
    seconds; whether the volume was left in reencryption."""
    proc = subprocess.Popen(
        ["cryptsetup", "reencrypt", "--force-offline-reencrypt", "-q", "--key-file",
         str(made.payload.with_suffix(".pass")), "--resilience", resilience,
         "--hotzone-size", "64K", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
         str(made.payload)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(sig)
    proc.wait(60)
    dump = run(["cryptsetup", "luksDump", str(made.payload)]).stdout
    return "online-reencrypt" in dump


def volume_key(path: Path, key: Path) -> bytes:
    out = run(["cryptsetup", "luksDump", "--dump-volume-key", "-q", "--key-file", str(key),
               str(path)]).stdout
    hexed = out.split("MK dump:", 1)[1]
    return bytes.fromhex("".join(re.findall(r"[0-9a-f]{2}", hexed)))


def reencrypting(tmp: Path, resilience: str, sig: int) -> tuple[Made, bytes]:
    tmp.mkdir(exist_ok=True)
    for i, delay in enumerate(DELAYS[resilience]):
        made = luks_format(tmp, size=SIZE, name=f"v{i}")
        data = pattern(SIZE - made.offset, seed=4)
        fill(made, data)
        if interrupted(made, resilience, delay, sig):
            return made, data
    pytest.skip("cryptsetup finished before every interruption")


@pytest.mark.parametrize("resilience", ["checksum", "journal", "none"])
def test_an_interrupted_reencryption_is_served_and_cryptsetup_finishes_it(
        tmp_path: Path, nbdluks: Callable[..., Any], resilience: str) -> None:
    need("cryptsetup", "nbdcopy")
    made, data = reencrypting(tmp_path, resilience, signal.SIGINT)
    info = json.loads(run([*NBDLUKS, "inspect", str(made.payload), "--json"]).stdout)
    state = info["reencryption"]
    assert state["mode"] == "reencrypt" and state["resilience"] == resilience
    assert {s["key"] for s in state["segments"]} == {"new", "old"}
    served = nbdluks("--payload", str(made.payload), "--key-file",
                     str(made.payload.with_suffix(".pass")))
    # while it is served, cryptsetup cannot take its reencryption lock
    p = subprocess.run(["cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt",
                        "-q", "--key-file", str(made.payload.with_suffix(".pass")),
                        str(made.payload)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "already running" in p.stderr, p.stderr
    out = tmp_path / "read"
    run(["nbdcopy", served.uri, str(out)])
    assert out.read_bytes() == data
    # writes across the boundary of the done and the pending part, and in each
    boundary = next(s["size"] for s in state["segments"] if s["key"] == "new")
    across = max(0, min(boundary - 2 * MiB, len(data) - 4 * MiB))  # overlaps apply in order
    edits = {across: pattern(4 * MiB, seed=8), 1000: pattern(70_000, seed=9),
             len(data) - 70_000: pattern(70_000, seed=10)}
    files = []
    for i, (offset, chunk) in enumerate(edits.items()):
        (tmp_path / f"edit{i}").write_bytes(chunk)
        files.append((str(tmp_path / f"edit{i}"), offset))
    script = ("h.connect_uri(sys.argv[1])\n"
              + "".join(f"h.pwrite(open({f!r}, 'rb').read(), {o})\n" for f, o in files)
              + "h.flush()\nprint('ok')\n")
    assert libnbd(script, served.uri).strip() == "ok"
    served.stop()
    expected = bytearray(data)
    for offset, chunk in edits.items():
        expected[offset : offset + len(chunk)] = chunk
    run(["cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
         "--key-file", str(made.payload.with_suffix(".pass")), str(made.payload)], timeout=300)
    assert "online-reencrypt" not in run(["cryptsetup", "luksDump", str(made.payload)]).stdout
    key = volume_key(made.payload, made.payload.with_suffix(".pass"))
    assert key != made.key
    with open(made.payload, "rb") as f:
        f.seek(made.offset)
        ct = f.read(len(data))
    assert crypt(ct, made.cipher, key, made.sector_size, encrypt=False) == bytes(expected)


def test_an_interrupted_step_is_refused_until_cryptsetup_recovers_it(
        tmp_path: Path, nbdluks: Callable[..., Any]) -> None:
    """kill -9 in the middle of a hotzone leaves a segment in-reencryption:
    served only after cryptsetup's recovery (repair), then byte for byte."""
    need("cryptsetup", "nbdcopy")
    for attempt in range(6):
        made, data = reencrypting(tmp_path / str(attempt), "checksum", signal.SIGKILL)
        if "in-reencryption" in run(["cryptsetup", "luksDump", "--debug-json",
                                     str(made.payload)]).stdout:
            break
    p = subprocess.run([*NBDLUKS, "inspect", str(made.payload), "--key-file",
                        str(made.payload.with_suffix(".pass"))], capture_output=True, text=True)
    if "was interrupted" in p.stdout + p.stderr:
        assert p.returncode == 1
    run(["cryptsetup", "repair", "-q", "--key-file", str(made.payload.with_suffix(".pass")),
         str(made.payload)])
    served = nbdluks("--payload", str(made.payload), "--key-file",
                     str(made.payload.with_suffix(".pass")), "--read-only")
    out = made.payload.parent / "read"
    run(["nbdcopy", served.uri, str(out)])
    assert out.read_bytes() == data


def test_a_forged_reencryption_is_refused(tmp_path: Path) -> None:
    """The verification digest binds the keys to the reencryption's
    parameters (cryptsetup's CVE-2021-4122 check): a header whose
    parameters were changed is refused."""
    made, _ = reencrypting(tmp_path, "checksum", signal.SIGINT)
    hdr = tmp_path / "forged"
    run(["cryptsetup", "luksHeaderBackup", str(made.payload), "--header-backup-file", str(hdr)])
    from nbdluks.luks import parse_header
    from nbdluks.luks.edit import Luks2Header

    raw = hdr.read_bytes()
    vol = parse_header(raw[: 8 * MiB])
    header = Luks2Header.from_volume(vol, raw)
    slot = next(k for k in header.md["keyslots"].values() if k["type"] == "reencrypt")
    slot["direction"] = "backward" if slot["direction"] == "forward" else "forward"
    forged = bytearray(raw)
    for step in header.writes():
        if hasattr(step, "data"):
            forged[step.offset : step.offset + len(step.data)] = step.data
    hdr.chmod(0o600)
    hdr.write_bytes(bytes(forged))
    p = subprocess.run([*NBDLUKS, "inspect", str(hdr), "--key-file",
                        str(made.payload.with_suffix(".pass"))], capture_output=True, text=True)
    assert p.returncode == 1 and "verification digest does not match" in p.stdout


NBDLUKS = [__import__("sys").executable, "-m", "nbdluks"]


def test_not_served_while_cryptsetup_reencrypts(tmp_path: Path) -> None:
    import fcntl

    made, _ = reencrypting(tmp_path, "checksum", signal.SIGINT)
    uuid = json.loads(run([*NBDLUKS, "inspect", str(made.payload), "--json"]).stdout)["uuid"]
    with open(f"/run/cryptsetup/LN_LUKS2-reencryption-{uuid}", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running cryptsetup reencrypt holds it
        p = subprocess.run([*NBDLUKS, "serve", "--payload", str(made.payload), "--key-file",
                            str(made.payload.with_suffix(".pass")), "-k",
                            str(tmp_path / "s.sock")], capture_output=True, text=True,
                           timeout=60)
    assert p.returncode == 1 and "cryptsetup is reencrypting this volume now" in p.stderr


def test_key_slots_do_not_change_during_a_reencryption(tmp_path: Path) -> None:
    made, _ = reencrypting(tmp_path, "journal", signal.SIGINT)
    new = tmp_path / "new.key"
    new.write_bytes(b"new")
    p = subprocess.run([*NBDLUKS, "add-key", "--payload", str(made.payload), "--key-file",
                        str(made.payload.with_suffix(".pass")), "--new-key-file", str(new)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "is being reencrypted" in p.stderr


def test_the_lock_file_goes_with_the_server(tmp_path: Path, nbdluks: Callable[..., Any]) -> None:
    made, _ = reencrypting(tmp_path, "journal", signal.SIGINT)
    uuid = json.loads(run([*NBDLUKS, "inspect", str(made.payload), "--json"]).stdout)["uuid"]
    lock = Path(f"/run/cryptsetup/LN_LUKS2-reencryption-{uuid}")
    served = nbdluks("--payload", str(made.payload), "--key-file",
                     str(made.payload.with_suffix(".pass")))
    assert lock.exists()
    assert served.stop() == 0
    assert not lock.exists()


def test_a_header_that_moves_on_while_opening_is_not_served(tmp_path: Path) -> None:
    """The header is read, then the key (here from a FIFO nobody writes yet);
    cryptsetup finishes the reencryption meanwhile: what was read is stale,
    and serving it would hand out ciphertext as plaintext."""
    import os
    import threading

    made, _ = reencrypting(tmp_path, "checksum", signal.SIGINT)
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*NBDLUKS, "serve", "--payload", str(made.payload), "--key-file",
                             str(fifo), "-k", str(tmp_path / "s.sock"), "--processes", "1"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # started and waiting for its key, the header read
    run(["cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
         "--key-file", str(made.payload.with_suffix(".pass")), str(made.payload)], timeout=300)
    writer = threading.Thread(target=lambda: fifo.write_bytes(
        made.payload.with_suffix(".pass").read_bytes()))
    writer.start()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        writer.join(5)
    assert proc.returncode == 1, err
    assert any(why in err for why in ("changed while the volume was being opened",
                                      "only one of", "no key slot matches")), err


def test_no_cryptsetup_reencryption_runs_on_a_served_volume(
        tmp_path: Path, nbdluks: Callable[..., Any]) -> None:
    """A LUKS2 volume served with one key: `cryptsetup reencrypt` cannot
    rewrite a sector under the server (that would serve ciphertext as
    plaintext); once the server is gone, it can."""
    need("cryptsetup")
    made = luks_format(tmp_path, size=24 * MiB)
    key = str(made.payload.with_suffix(".pass"))
    data_before = made.payload.read_bytes()[made.offset :]
    served = nbdluks("--payload", str(made.payload), "--key-file", key)
    cmd = ["cryptsetup", "reencrypt", "--force-offline-reencrypt", "-q", "--pbkdf", "pbkdf2",
           "--pbkdf-force-iterations", "1000", "--key-file", key, str(made.payload)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "already running" in p.stderr, p.stderr
    assert made.payload.read_bytes()[made.offset :] == data_before
    assert served.stop() == 0
    resume = [c for c in cmd if c not in ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
                                          "1000")]
    run([*resume[:2], "--resume-only", *resume[2:]])  # cryptsetup started it: it goes on
    assert "online-reencrypt" not in run(["cryptsetup", "luksDump", str(made.payload)]).stdout
    assert made.payload.read_bytes()[made.offset :] != data_before
