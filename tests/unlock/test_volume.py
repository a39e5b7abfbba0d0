"""Opening many volumes: in parallel, never more Argon2 memory at once than
the cap, failures by name."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nbdluks.luks import LuksError
from nbdluks.unlock import UnlockOptions, VolumeConfig, open_volumes
from nbdluks.unlock.volume import MemoryGate
from tests.conftest import need
from tests.luks.reference import luks_format


def test_the_gate_holds_back_what_does_not_fit() -> None:
    gate = MemoryGate(100)
    release_a = threading.Event()
    entered: dict[str, threading.Event] = {n: threading.Event() for n in "abc"}

    def take(name: str, kib: int, until: threading.Event | None = None) -> None:
        with gate.hold(kib):
            entered[name].set()
            if until is not None:
                until.wait(30)

    a = threading.Thread(target=take, args=("a", 80, release_a))
    a.start()
    assert entered["a"].wait(10)
    b = threading.Thread(target=take, args=("b", 50))
    c = threading.Thread(target=take, args=("c", 1000))  # more than the cap: alone
    b.start()
    c.start()
    assert not entered["b"].wait(0.3) and not entered["c"].is_set()
    release_a.set()
    for t in (a, b, c):
        t.join(10)
    assert entered["b"].is_set() and entered["c"].is_set() and gate.used == 0


def test_volumes_open_in_parallel_within_the_cap(tmp_path: Path) -> None:
    need("cryptsetup")
    configs = []
    for i in range(4):
        made = luks_format(tmp_path, name=f"v{i}", pbkdf="argon2id", size=20 << 20,
                           passphrase=f"pass {i}".encode())
        key = tmp_path / f"v{i}.pass"
        if i == 2:
            key = tmp_path / "wrong"
            key.write_bytes(b"wrong")
        configs.append(VolumeConfig(name=f"v{i}", payload=str(made.payload),
                                    keys=UnlockOptions(key_file=str(key))))
    # a cap below one volume's 32 KiB: one unlock at a time, all still open
    opened, failed = open_volumes(configs, workers=4, argon2_cap_kib=16)
    try:
        assert [v.name for v in opened] == ["v0", "v1", "v3"]
        assert list(failed) == ["v2"] and "no key slot" in str(failed["v2"])
    finally:
        for v in opened:
            v.close()


def hours_of_pbkdf2(tmp: Path) -> Path:
    """A LUKS2 volume whose only key slot asks for 2^31-1 PBKDF2 iterations
    (what a hostile header can ask: hours of CPU)."""
    from tests.luks.test_verdicts import write_json

    made = luks_format(tmp, detached=True, size=1 << 20)
    assert made.header is not None

    def slow(md: dict[str, Any]) -> None:
        md["keyslots"]["0"]["kdf"]["iterations"] = 2**31 - 1

    write_json(made.header, slow)
    return made.header


@pytest.mark.parametrize("config", [False, True], ids=["one volume", "--config"])
def test_a_stop_ends_a_long_unlock_at_once(tmp_path: Path, config: bool) -> None:
    need("cryptsetup")
    header = hours_of_pbkdf2(tmp_path)
    payload, key = tmp_path / "vol.payload", tmp_path / "vol.pass"
    if config:
        cfg = tmp_path / "exports.toml"
        cfg.write_text(f'[exports.a]\npayload = "{payload}"\nheader = "{header}"\n'
                       f'key-file = "{key}"\nkdf-limit = 1e9\n')  # let it run
        args = ["--config", str(cfg), "-k", str(tmp_path / "s.sock")]
    else:
        args = ["--payload", str(payload), "--header", str(header), "--key-file", str(key),
                "--kdf-limit", "1e9"]
    proc = subprocess.Popen([sys.executable, "-m", "nbdluks", "serve", *args,
                             "--log-format", "json"], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)  # well into the KDF (it would take many minutes)
        assert proc.poll() is None
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    assert took < 2.0, took
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()


def hostile_first_slot(tmp: Path, pbkdf: str) -> tuple[Path, Path, Path]:
    """A LUKS2 volume (detached header) with two slots of one passphrase,
    slot 0 edited to a KDF that would run for hours: (payload, header, key)."""
    from tests.luks.test_verdicts import write_json

    made = luks_format(tmp, detached=True, size=1 << 20, pbkdf=pbkdf)
    assert made.header is not None
    key = tmp / "vol.pass"
    cost = (["--pbkdf-force-iterations", "1000"] if pbkdf == "pbkdf2" else
            ["--pbkdf-force-iterations", "4", "--pbkdf-memory", "32", "--pbkdf-parallel", "1"])
    subprocess.run(["cryptsetup", "luksAddKey", "-q", "--key-file", str(key), "--pbkdf", pbkdf,
                    *cost, "--new-keyfile", str(key), str(made.header)],
                   check=True, capture_output=True, timeout=60)

    def slow(md: dict[str, Any]) -> None:
        kdf = md["keyslots"]["0"]["kdf"]
        if pbkdf == "pbkdf2":
            kdf["iterations"] = 2**31 - 1  # ~20 min at 3.5 M/s, two output blocks
        else:
            kdf["time"] = 2**32 - 1  # days

    write_json(made.header, slow)
    return made.payload, made.header, key


@pytest.mark.parametrize("pbkdf", ["pbkdf2", "argon2id"])
def test_a_slot_that_would_derive_for_hours_is_refused_and_the_next_opens(
        tmp_path: Path, pbkdf: str) -> None:
    need("cryptsetup")
    from nbdluks.unlock import open_volume

    payload, header, key = hostile_first_slot(tmp_path, pbkdf)
    config = VolumeConfig(name="a", payload=str(payload), headers=(str(header),),
                          keys=UnlockOptions(key_file=str(key)))
    t = time.monotonic()
    volume = open_volume(config)  # before: slot 0's KDF ran for hours
    took = time.monotonic() - t
    try:
        assert volume.keyslot == 1 and took < 10, took
    finally:
        volume.close()
    # alone, the slot is refused with the estimate, and at once
    only = replace(config, keys=UnlockOptions(key_file=str(key), key_slot=0, kdf_limit=60))
    t = time.monotonic()
    with pytest.raises(LuksError, match=r"key slot 0 would take about [\d,]+ s to derive "
                                        r"here, more than the 60 s allowed") as e:
        open_volume(only)
    print(f"refused in {time.monotonic() - t:.3f} s: {e.value}")
    assert time.monotonic() - t < 5
