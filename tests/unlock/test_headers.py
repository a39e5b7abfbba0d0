"""Several --header sources: a backup rescues a lost or damaged header
store; copies of different volumes are never mixed; one unusable key slot
does not make a volume unusable; inspect and serve agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, log_events, need, pattern, run
from tests.luks.reference import Made, add_key, fill, luks_format
from tests.luks.test_headers import flip
from tests.luks.test_verdicts import write_json

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("cryptsetup", "nbdcopy")


def volume(tmp: Path, name: str = "vol") -> tuple[Made, bytes, Path]:
    """A detached-header volume with known plaintext, and a backup of its header."""
    made = luks_format(tmp, detached=True, size=2 * MiB, name=name)
    assert made.header
    data = pattern(2 * MiB, seed=7)
    fill(made, data)
    backup = tmp / f"{name}.backup"
    run(["cryptsetup", "luksHeaderBackup", "--header-backup-file", str(backup),
         str(made.header)])
    return made, data, backup


def served_bytes(srv_uri: str, tmp: Path) -> bytes:
    out = tmp / "copy.img"
    out.unlink(missing_ok=True)
    run(["nbdcopy", srv_uri, str(out)])
    return out.read_bytes()


@pytest.mark.parametrize("first", ["missing file", "unreachable NBD server", "damaged"])
def test_the_backup_serves_when_the_first_copy_is_lost(nbdluks, tmp_path: Path,
                                                       first: str) -> None:
    made, data, backup = volume(tmp_path)
    assert made.header
    if first == "missing file":
        lost = str(tmp_path / "gone.hdr")
    elif first == "unreachable NBD server":
        lost = f"nbd://127.0.0.1:{free_port()}/"
    else:
        flip(made.header, 4096 + 10)  # both copies' checksums
        flip(made.header, 16384 + 4096 + 10)
        lost = str(made.header)
    srv = nbdluks("--payload", str(made.payload), "--header", lost, "--header", str(backup),
                  "--passphrase-file", str(tmp_path / "vol.pass"))
    assert served_bytes(srv.uri, tmp_path) == data
    assert srv.stop() == 0
    log = srv.log_text()
    bad = log_events(log, "header copy unusable")
    assert [b["source"] for b in bad] == [lost]
    assert log_events(log, "header copy in use")[0]["source"] == str(backup)


def test_copies_of_different_volumes_refuse_to_start(tmp_path: Path) -> None:
    made, _, _ = volume(tmp_path)
    other, _, _ = volume(tmp_path, name="other")
    assert made.header and other.header
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--payload", str(made.payload),
                        "--header", str(made.header), "--header", str(other.header),
                        "--key-file", str(tmp_path / "vol.pass"), "-k",
                        str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "are of different volumes (their UUID differs): refusing to mix" in p.stderr
    assert not (tmp_path / "s.sock").exists()


def test_a_key_added_after_the_backup_opens_through_the_copy_that_has_it(
        nbdluks, tmp_path: Path) -> None:
    made, data, backup = volume(tmp_path)
    assert made.header
    (tmp_path / "new.pass").write_bytes(b"added later")
    add_key(made.header, tmp_path / "vol.pass", tmp_path / "new.pass")
    srv = nbdluks("--payload", str(made.payload), "--header", str(backup), "--header",
                  str(made.header), "--key-file", str(tmp_path / "new.pass"))
    assert served_bytes(srv.uri, tmp_path) == data
    assert srv.stop() == 0
    log = srv.log_text()
    assert log_events(log, "header copy does not unlock")[0]["source"] == str(backup)
    assert log_events(log, "volume unlocked")[0]["keyslot"] == 1


def test_inspect_compares_copies(tmp_path: Path) -> None:
    made, _, backup = volume(tmp_path)
    other, _, _ = volume(tmp_path, name="other")
    assert made.header and other.header

    def inspect(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nbdluks", "inspect", *args],
                              capture_output=True, text=True, timeout=60)

    p = inspect(str(made.header), str(backup), "--key-file", str(tmp_path / "vol.pass"))
    assert p.returncode == 0, p.stderr
    assert f"Header copy {backup}: ok, epoch" in p.stdout and "agrees" in p.stdout
    assert "Key OK: key slot 0 opened" in p.stdout
    p = inspect(str(made.header), str(other.header), str(tmp_path / "nope"), "--json")
    assert p.returncode == 1
    copies = json.loads(p.stdout)["copies"]
    assert [(c["ok"], c["agrees"]) for c in copies] == [(True, True), (True, False),
                                                         (False, False)]


def test_an_unusable_slot_next_to_a_good_one(nbdluks, tmp_path: Path) -> None:
    """An unknown KDF in slot 1 (e.g. "argon2" as in old headers): slot 0
    still opens; inspect shows why slot 1 cannot be used."""
    made, data, _ = volume(tmp_path)
    assert made.header
    (tmp_path / "p1").write_bytes(b"slot one")
    add_key(made.header, tmp_path / "vol.pass", tmp_path / "p1")
    write_json(made.header, lambda md: md["keyslots"]["1"]["kdf"].update(type="argon2"))
    run(["cryptsetup", "luksDump", str(made.header)])  # cryptsetup takes it too
    srv = nbdluks("--payload", str(made.payload), "--header", str(made.header),
                  "--passphrase-file", str(tmp_path / "vol.pass"))
    assert served_bytes(srv.uri, tmp_path) == data
    assert srv.stop() == 0
    out = run([sys.executable, "-m", "nbdluks", "inspect", str(made.header)]).stdout
    assert "1: argon2, priority normal, UNUSABLE: key slot 1 kdf type 'argon2' is not " \
           "supported" in out
    # the unusable slot named: its reason, not a wrong-passphrase message
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--payload",
                        str(made.payload), "--header", str(made.header), "--key-slot", "1",
                        "--passphrase-file", str(tmp_path / "p1"), "-k",
                        str(tmp_path / "x.sock")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "kdf type 'argon2' is not supported" in p.stderr, p.stderr


def test_inspect_and_serve_agree_on_a_segment_beyond_the_device(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=18 * MiB)  # attached
    write_json(made.payload, lambda md: md["segments"]["0"].update(size=str(64 * MiB)))
    run(["cryptsetup", "luksDump", str(made.payload)])  # a valid header...
    p = subprocess.run([sys.executable, "-m", "nbdluks", "inspect", str(made.payload),
                        "--key-file", str(tmp_path / "vol.pass")], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1
    assert "Key FAILED: the key opens, but serve would refuse: the data segment needs" \
        in p.stdout
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--payload",
                        str(made.payload), "--key-file", str(tmp_path / "vol.pass"), "-k",
                        str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "the data segment needs" in p.stderr, p.stderr


def test_inspect_shows_tokens_and_an_unservable_volume(tmp_path: Path) -> None:
    made, _, _ = volume(tmp_path)
    assert made.header
    (tmp_path / "t.json").write_text(json.dumps({"type": "clevis", "keyslots": ["0"],
                                                 "jwe": {"ciphertext": "x"}}))
    run(["cryptsetup", "token", "import", "--json-file", str(tmp_path / "t.json"),
         str(made.header)])
    write_json(made.header, lambda md: md["config"].update(
        requirements={"mandatory": ["future-feature"]}))
    p = run([sys.executable, "-m", "nbdluks", "inspect", str(made.header)])
    assert "Tokens:\n  0: clevis, key slots 0" in p.stdout
    assert "Cannot be served: it has mandatory requirements this server does not implement: " \
           "future-feature" in p.stdout
    p = subprocess.run([sys.executable, "-m", "nbdluks", "serve", "--payload",
                        str(made.payload), "--header", str(made.header), "--key-file",
                        str(tmp_path / "vol.pass"), "-k", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "future-feature" in p.stderr
