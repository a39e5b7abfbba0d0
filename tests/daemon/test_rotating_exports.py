"""`serve --config` with exports marked `reencrypt = true`: their keys are
rotated while every export is served (cryptsetup agrees at the end), a
client of an unmarked export reads byte-exact meanwhile, and a reload that
removes or changes a rotating export stops its reencryption between two
steps (cryptsetup finishes the removed one)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Served, need, run
from tests.luks.reference import Made
from tests.manage.test_reencrypt import cryptsetup_resume, final_plaintext, made_with_data

pytestmark = pytest.mark.slow


def table(name: str, made: Made, rotate: str = "") -> str:
    key = made.payload.with_suffix(".pass")
    return f'[exports.{name}]\npayload = "{made.payload}"\nkey-file = "{key}"\n{rotate}\n'


def rotate(rate: int) -> str:
    return f'reencrypt = true\nreencrypt-rate = {rate}\nhotzone-size = "1M"\n'


def copy_is(served: Served, name: str, data: bytes, tmp: Path) -> None:
    out = tmp / f"{name}.copy"
    run(["nbdcopy", f"nbd+unix:///{name}?socket={served.socket}", str(out)])
    assert out.read_bytes() == data, name


def finished(served: Served, name: str) -> bool:
    return any('"reencryption finished"' in line and f'"export": "{name}"' in line
               for line in served.log_text().splitlines())


def rotated(made: Made, data: bytes) -> None:
    """cryptsetup: no requirement left, the passphrase opens, the new key
    decrypts the data."""
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and plain == data
    run(["cryptsetup", "open", "--test-passphrase", "--key-file",
         str(made.payload.with_suffix(".pass")), str(made.payload)])


def in_reencryption(made: Made) -> bool:
    return "online-reencrypt" in run(["cryptsetup", "luksDump", str(made.payload)]).stdout


def test_marked_exports_rotate_while_the_others_are_read(
        nbdluks: Callable[..., Served], tmp_path: Path) -> None:
    need("cryptsetup", "nbdcopy")
    vols = {n: made_with_data(tmp_path, n) for n in ("a", "b", "c")}
    cfg = tmp_path / "exports.toml"
    cfg.write_text(table("a", vols["a"][0], rotate(16)) + table("b", vols["b"][0], rotate(16))
                   + table("c", vols["c"][0]))
    served = nbdluks("--config", str(cfg))
    deadline = time.monotonic() + 120
    while not (finished(served, "a") and finished(served, "b")):
        text = served.log_text()  # a reencryption that died says why, not a tail of reads
        assert '"reencryption failed' not in text, text[text.index('"reencryption failed'):]
        for name in ("c", "a", "b"):  # the unmarked one, and the rotating ones meanwhile
            copy_is(served, name, vols[name][1], tmp_path)
        assert time.monotonic() < deadline, served.log_text()[-3000:]
    copy_is(served, "c", vols["c"][1], tmp_path)
    assert served.stop() == 0
    for name in ("a", "b"):
        rotated(*vols[name])
    assert final_plaintext(vols["c"][0], len(vols["c"][1]))[0] == vols["c"][0].key


def test_a_reload_stops_a_removed_or_changed_reencryption_between_two_steps(
        nbdluks: Callable[..., Served], tmp_path: Path) -> None:
    need("cryptsetup", "nbdcopy")
    vols = {n: made_with_data(tmp_path, n) for n in ("a", "b")}
    cfg = tmp_path / "exports.toml"
    cfg.write_text(table("a", vols["a"][0], rotate(2)) + table("b", vols["b"][0], rotate(2)))
    served = nbdluks("--config", str(cfg))
    deadline = time.monotonic() + 60
    while served.log_text().count('"reencryption step done"') < 4:
        assert time.monotonic() < deadline, served.log_text()[-3000:]
        time.sleep(0.1)
    # a is removed, b changed (faster): both stop between two steps first
    cfg.write_text(table("b", vols["b"][0], rotate(32)))
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 120
    while "configuration reloaded" not in served.log_text():
        assert time.monotonic() < deadline, served.log_text()[-3000:]
        time.sleep(0.1)
    log = served.log_text()
    for name in ("a", "b"):
        assert f'"reencryption stopped for the reload", "export": "{name}"' in log \
            or f'"export": "{name}", "event": "reencryption stopped for the reload"' in log, name
    assert in_reencryption(vols["a"][0])  # stopped, not finished
    while not finished(served, "b"):
        copy_is(served, "b", vols["b"][1], tmp_path)
        assert time.monotonic() < deadline, served.log_text()[-3000:]
    copy_is(served, "b", vols["b"][1], tmp_path)
    assert served.stop() == 0
    rotated(*vols["b"])
    assert in_reencryption(vols["a"][0])
    cryptsetup_resume(vols["a"][0])  # what a stop left, cryptsetup finishes
    rotated(*vols["a"])


def test_a_reencrypt_key_of_the_wrong_type_is_one_line(tmp_path: Path) -> None:
    made, _ = made_with_data(tmp_path, "a")
    cfg = tmp_path / "exports.toml"
    cfg.write_text(table("a", made, 'reencrypt = true\nhotzone-size = "lots"\n'))
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--config", str(cfg), "-k",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "[exports.a] hotzone-size" in p.stderr, p.stderr
