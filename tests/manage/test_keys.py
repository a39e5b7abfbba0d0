"""add-key, change-key, remove-key, kill-slot on volumes cryptsetup made
(and the reverse), on a header file and on one behind nbdkit; judged by
cryptsetup open --test-passphrase."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import libnbd, pattern, run
from tests.luks.reference import add_key, luks_format
from tests.manage.conftest import ARGON2, PBKDF2, MiB, cli, digest, dump, keyfile, opens


@pytest.mark.parametrize("version", [1, 2])
def test_keys_change_as_cryptsetup_sees_them(
        tmp_path: Path, source: Callable[..., str], version: int) -> None:
    made = luks_format(tmp_path, version=version, size=32 * MiB, detached=True)
    header, payload = made.header_path, made.payload
    first, second, third = (tmp_path / "vol.pass", keyfile(tmp_path, "second"),
                            keyfile(tmp_path, "third"))
    src = source(header)
    kdf = PBKDF2 if version == 1 else ARGON2
    out = cli("add-key", "--header", src, "--key-file", first, "--new-key-file", second,
              *kdf).stdout
    assert "key slot 1 added" in out
    assert opens(header, first, payload) and opens(header, second, payload)
    out = cli("change-key", "--header", src, "--key-file", second, "--new-key-file", third,
              *kdf).stdout
    # LUKS2 keeps the slot number, LUKS1 moves to a free slot (as cryptsetup)
    assert f"key slot {1 if version == 2 else 2} changed" in out
    assert opens(header, third, payload) and not opens(header, second, payload)
    out = cli("remove-key", "--header", src, "--key-file", first).stdout
    assert "key slot 0 removed" in out
    assert not opens(header, first, payload) and opens(header, third, payload)
    # the last key is kept unless forced
    p = cli("remove-key", "--header", src, "--key-file", third, check=False)
    assert p.returncode == 1 and "is the last one" in p.stderr
    assert opens(header, third, payload)


def test_kill_slot_needs_a_key_of_another_slot(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=32 * MiB)
    first, second = tmp_path / "vol.pass", keyfile(tmp_path, "second")
    add_key(made.payload, first, second)
    p = cli("kill-slot", "1", "--payload", made.payload, "--key-file", second, check=False)
    assert p.returncode == 1 and "opens key slot 1 itself" in p.stderr
    p = cli("kill-slot", "5", "--payload", made.payload, "--key-file", first, check=False)
    assert p.returncode == 1 and "key slot 5 is not active (active: 0, 1)" in p.stderr
    cli("kill-slot", "1", "--payload", made.payload, "--key-file", first)
    assert opens(made.payload, first) and not opens(made.payload, second)
    cli("kill-slot", "0", "--payload", made.payload, "--force")
    assert "Keyslots:\nTokens:" in dump(made.payload)


@pytest.mark.parametrize("version", [1, 2])
def test_cryptsetup_rekeys_our_volume_and_we_rekey_theirs(tmp_path: Path, version: int) -> None:
    payload = tmp_path / "ours"
    with open(payload, "wb") as f:
        f.truncate(32 * MiB)
    first, second = keyfile(tmp_path, "first"), keyfile(tmp_path, "second")
    cli("format", "--type", f"luks{version}", "--payload", payload, "--key-file", first,
        *PBKDF2)
    add_key(payload, first, second)  # cryptsetup on ours
    check = json.loads(cli("inspect", payload, "--key-file", second, "--json").stdout)
    assert check["key_check"] == {"ok": True, "keyslot": 1, "source": str(payload)}
    run(["cryptsetup", "luksKillSlot", "-q", str(payload), "0"])
    assert not opens(payload, first) and opens(payload, second)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, source: Callable[..., str]
                                                  ) -> None:
    made = luks_format(tmp_path, version=1, size=32 * MiB, detached=True)
    header = made.header_path
    first, wrong = tmp_path / "vol.pass", keyfile(tmp_path, "wrong")
    for i in range(1, 8):
        add_key(header, first, keyfile(tmp_path, f"k{i}"))
    before = digest(header)
    src = source(header)
    cases = [
        (("add-key", "--key-file", first, "--new-key-file", wrong), 1,
         "all 8 key slots are in use"),
        (("add-key", "--key-file", first, "--new-key-file", wrong, "--new-key-slot", "40"), 2,
         "--new-key-slot 40: must be 0..31"),
        (("add-key", "--key-file", first, "--new-key-file", wrong, "--new-key-slot", "9"), 1,
         "key slot 9 is out of range (0-7)"),
        (("add-key", "--key-file", first, "--new-key-file", wrong, "--pbkdf", "argon2id"), 1,
         "LUKS1 key slots use pbkdf2 only"),
        (("change-key", "--key-file", first, "--new-key-file", wrong), 1,
         "all 8 key slots are in use"),
        (("remove-key", "--key-file", wrong), 1, "no key slot matches this passphrase"),
        (("kill-slot", "3", "--key-file", wrong), 1, "no key slot matches"),
        (("add-key", "--key-file", first, "--new-key-file", wrong, "--iter-time", "0"), 2,
         "-i/--iter-time 0: must be 1..3600000"),
    ]
    for args, status, message in cases:
        kdf = PBKDF2[:2] if args[0] in ("add-key", "change-key") else ()
        p = cli(args[0], "--header", src, *kdf, *args[1:], check=False)
        assert p.returncode == status, (args, p.stderr)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert digest(header) == before


def test_read_only_source_is_refused(tmp_path: Path, source: Callable[..., str]) -> None:
    made = luks_format(tmp_path, size=32 * MiB, detached=True)
    src = source(made.header_path, read_only=True)
    if "://" not in src:
        pytest.skip("root writes any local file")
    before = digest(made.header_path)
    p = cli("add-key", "--header", src, "--key-file", tmp_path / "vol.pass", "--new-key-file",
            keyfile(tmp_path, "new"), *PBKDF2, check=False)
    assert p.returncode == 1 and "read-only" in p.stderr
    assert digest(made.header_path) == before


def test_a_header_cryptsetup_holds_is_not_written(tmp_path: Path) -> None:
    """cryptsetup's lock on a regular file is flock on the file itself."""
    made = luks_format(tmp_path, size=32 * MiB)
    before = digest(made.payload)
    with open(made.payload, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        p = cli("add-key", "--payload", made.payload, "--key-file", tmp_path / "vol.pass",
                "--new-key-file", keyfile(tmp_path, "new"), *PBKDF2, check=False)
    assert p.returncode == 1 and "locked by another process" in p.stderr
    assert digest(made.payload) == before


def test_secrets_never_reach_the_log(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=32 * MiB, passphrase=b"old-secret-Zq9")
    new = keyfile(tmp_path, "new", b"new-secret-Xw7")
    p = cli("add-key", "--payload", made.payload, "--passphrase-file", tmp_path / "vol.pass",
            "--new-passphrase-file", new, "--log-level", "debug", *PBKDF2)
    p2 = cli("remove-key", "--payload", made.payload, "--passphrase-file", new, "--log-level",
             "debug", check=False)
    for out in (p.stdout, p.stderr, p2.stdout, p2.stderr):
        assert "secret-" not in out and made.key.hex() not in out


def test_a_served_volume_keeps_serving_while_its_keys_change(
        tmp_path: Path, nbdluks: Callable[..., object]) -> None:
    made = luks_format(tmp_path, size=32 * MiB)
    first = tmp_path / "vol.pass"
    served = nbdluks("--payload", str(made.payload), "--key-file", str(first))
    uri = served.uri  # type: ignore[attr-defined]
    data = pattern(MiB, seed=11)
    (tmp_path / "data").write_bytes(data)
    script = ("h.connect_uri(sys.argv[1])\n"
              f"data = open({str(tmp_path / 'data')!r}, 'rb').read()\n"
              "for i in range(8):\n"
              "    h.pwrite(data, i * len(data))\n"
              "    h.flush()\n"
              "    assert h.pread(len(data), i * len(data)) == data\n"
              "print('ok')\n")
    keys = [keyfile(tmp_path, f"k{i}") for i in range(3)]
    for k in keys:
        cli("add-key", "--payload", made.payload, "--key-file", first, "--new-key-file", k,
            *PBKDF2)
        assert libnbd(script, uri).strip() == "ok"
    cli("remove-key", "--payload", made.payload, "--key-file", first)
    cli("change-key", "--payload", made.payload, "--key-file", keys[0], "--new-key-file",
        first, *PBKDF2)
    assert libnbd(script, uri).strip() == "ok"
    served.stop()  # type: ignore[attr-defined]
    assert opens(made.payload, first) and not opens(made.payload, keys[0])
    # the data went where the key says: a new server with the changed key reads it back
    again = nbdluks("--payload", str(made.payload), "--key-file", str(keys[1]))
    check = ("h.connect_uri(sys.argv[1])\n"
             f"data = open({str(tmp_path / 'data')!r}, 'rb').read()\n"
             "print(h.pread(len(data), 7 * len(data)) == data)\n")
    assert libnbd(check, again.uri).strip() == "True"  # type: ignore[attr-defined]


def test_the_new_passphrase_from_standard_input(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=32 * MiB)
    cli("add-key", "--payload", made.payload, "--key-file", tmp_path / "vol.pass",
        "--new-passphrase-file", "-", *PBKDF2, input=b"piped\nignored after the line")
    assert opens(made.payload, keyfile(tmp_path, "piped"))
    p = cli("add-key", "--payload", made.payload, "--key-file", "-", "--new-passphrase-file",
            "-", *PBKDF2, input=b"x", check=False)
    assert p.returncode == 2 and "standard input cannot give both" in p.stderr


def test_a_luks1_header_keeps_its_hash(tmp_path: Path) -> None:
    """Old cryptsetup made LUKS1 volumes with sha1: new slots use the
    header's hash whatever the option says (one hash per LUKS1 header)."""
    made = luks_format(tmp_path, version=1, hash="sha1", size=32 * MiB)
    first, second, third = (tmp_path / "vol.pass", keyfile(tmp_path, "second"),
                            keyfile(tmp_path, "third"))
    cli("add-key", "--payload", made.payload, "--key-file", first, "--new-key-file", second,
        *PBKDF2)
    cli("change-key", "--payload", made.payload, "--key-file", second, "--new-key-file",
        third, *PBKDF2)
    assert opens(made.payload, first) and opens(made.payload, third)
    assert "Hash spec:     \tsha1" in dump(made.payload)
