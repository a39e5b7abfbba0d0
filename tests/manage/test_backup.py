"""header-backup / header-restore against cryptsetup's luksHeaderBackup and
luksHeaderRestore, both ways; a backup serves as a detached header."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import libnbd, pattern, run
from tests.luks.reference import add_key, fill, luks_format
from tests.manage.conftest import MiB, cli, digest, keyfile, opens


@pytest.mark.parametrize("version", [1, 2])
def test_backup_is_byte_for_byte_cryptsetups(tmp_path: Path, source: Callable[..., str],
                                             version: int) -> None:
    made = luks_format(tmp_path, version=version, size=32 * MiB, detached=True)
    ours, theirs = tmp_path / "ours.bk", tmp_path / "theirs.bk"
    out = cli("header-backup", ours, "--header", source(made.header_path)).stdout
    run(["cryptsetup", "luksHeaderBackup", str(made.header_path), "--header-backup-file",
         str(theirs)])
    assert ours.read_bytes() == theirs.read_bytes()
    assert f"({ours.stat().st_size} bytes)" in out
    assert oct(ours.stat().st_mode & 0o777) == "0o400"
    p = cli("header-backup", ours, "--payload", made.header_path, check=False)
    assert p.returncode == 1 and "already exists" in p.stderr


@pytest.mark.parametrize("version", [1, 2])
def test_restore_both_ways(tmp_path: Path, version: int) -> None:
    made = luks_format(tmp_path, version=version, size=32 * MiB)
    first, later = tmp_path / "vol.pass", keyfile(tmp_path, "later")
    ours, theirs = tmp_path / "ours.bk", tmp_path / "theirs.bk"
    cli("header-backup", ours, "--payload", made.payload)
    run(["cryptsetup", "luksHeaderBackup", str(made.payload), "--header-backup-file",
         str(theirs)])
    add_key(made.payload, first, later)
    assert opens(made.payload, later)
    run(["cryptsetup", "luksHeaderRestore", "-q", str(made.payload), "--header-backup-file",
         str(ours)])
    assert opens(made.payload, first) and not opens(made.payload, later)
    add_key(made.payload, first, later)
    out = cli("header-restore", theirs, "--payload", made.payload).stdout
    assert "restored from" in out
    assert opens(made.payload, first) and not opens(made.payload, later)


def test_restore_refuses_another_volume_unless_forced(tmp_path: Path) -> None:
    a = luks_format(tmp_path, size=32 * MiB, name="a")
    b = luks_format(tmp_path, size=32 * MiB, name="b", passphrase=b"other")
    bk = tmp_path / "b.bk"
    cli("header-backup", bk, "--payload", b.payload)
    before = digest(a.payload)
    p = cli("header-restore", bk, "--payload", a.payload, check=False)
    assert p.returncode == 1 and "is of another volume" in p.stderr
    assert digest(a.payload) == before
    l1 = luks_format(tmp_path, version=1, size=32 * MiB, name="l1")
    p = cli("header-restore", bk, "--payload", l1.payload, check=False)
    assert p.returncode == 1 and "is LUKS2, the volume LUKS1" in p.stderr
    cli("header-restore", bk, "--payload", a.payload, "--force")
    assert opens(a.payload, tmp_path / "b.pass")


def test_restore_over_no_header_needs_force(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=32 * MiB)
    bk = tmp_path / "bk"
    cli("header-backup", bk, "--payload", made.payload)
    with open(made.payload, "r+b") as f:  # both copies' binary headers destroyed
        f.write(bytes(4096))
        f.seek(16384)
        f.write(bytes(4096))
    assert not opens(made.payload, tmp_path / "vol.pass")
    p = cli("header-restore", bk, "--payload", made.payload, check=False)
    assert p.returncode == 1 and "holds no valid LUKS header" in p.stderr
    cli("header-restore", bk, "--payload", made.payload, "--force")
    assert opens(made.payload, tmp_path / "vol.pass")


@pytest.mark.parametrize("version", [1, 2])
def test_a_backup_serves_as_the_header(tmp_path: Path, nbdluks: Callable[..., object],
                                       version: int) -> None:
    """cryptsetup opens a LUKS1 backup (shorter than its payload offset) as
    --header; so does serve."""
    made = luks_format(tmp_path, version=version, size=32 * MiB)
    data = pattern(MiB, seed=2)
    fill(made, data)
    bk = tmp_path / "bk"
    run(["cryptsetup", "luksHeaderBackup", str(made.payload), "--header-backup-file", str(bk)])
    assert os.path.getsize(bk) < made.offset or version == 2
    served = nbdluks("--header", str(bk), "--payload", str(made.payload), "--key-file",
                     str(tmp_path / "vol.pass"), "--read-only")
    script = "h.connect_uri(sys.argv[1])\nprint(h.pread(1048576, 0).hex())\n"
    assert libnbd(script, served.uri).strip() == data.hex()  # type: ignore[attr-defined]


def test_restore_onto_an_nbd_store(tmp_path: Path, source: Callable[..., str]) -> None:
    made = luks_format(tmp_path, size=32 * MiB, detached=True)
    bk = tmp_path / "bk"
    cli("header-backup", bk, "--header", made.header_path)
    add_key(made.header_path, tmp_path / "vol.pass", keyfile(tmp_path, "later"))
    cli("header-restore", bk, "--header", source(made.header_path))
    assert not opens(made.header_path, tmp_path / "later", made.payload)
    assert opens(made.header_path, tmp_path / "vol.pass", made.payload)
