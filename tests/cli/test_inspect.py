"""`nbdluks inspect` agrees with `cryptsetup luksDump`, tests keys like
`open --test-passphrase`, and fails with one line on bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need
from tests.luks.reference import luks_format

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("cryptsetup")


def nbdluks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdluks", "inspect", *args],
                          capture_output=True, text=True, timeout=120)


def inspect_json(*args: str) -> Any:
    p = nbdluks("--json", *args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def dump(path: Path) -> str:
    return subprocess.run(["cryptsetup", "luksDump", str(path)], capture_output=True,
                          text=True, check=True).stdout


def field(text: str, name: str) -> str:
    m = re.search(rf"^\s*{re.escape(name)}:\s*(.*?)\s*$", text, re.M)
    assert m, name
    return m.group(1)


def hexfield(text: str, name: str) -> str:
    """A multi-line hex field of luksDump, as one hex string."""
    lines = text.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.strip().startswith(f"{name}:"))
    out = lines[i].split(":", 1)[1].split()
    for ln in lines[i + 1 :]:
        words = ln.split()
        if not words or not all(re.fullmatch(r"[0-9a-f]{2}", w) for w in words):
            break
        out += words
    return "".join(out)


@pytest.mark.parametrize("pbkdf", ["pbkdf2", "argon2id", "argon2i"])
def test_luks2_agrees_with_luksdump(tmp_path: Path, pbkdf: str) -> None:
    made = luks_format(tmp_path, pbkdf=pbkdf, sector_size=4096, detached=True, size=MiB,
                       extra=("--label", "my-disk", "--subsystem", "test-sub"))
    assert made.header
    info = inspect_json(str(made.header))
    text = dump(made.header)
    md = json.loads(subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(made.header)],
        capture_output=True, text=True, check=True).stdout)
    assert info["metadata"] == md
    assert info["version"] == int(field(text, "Version"))
    assert info["uuid"] == field(text, "UUID")
    assert info["label"] == field(text, "Label")
    assert info["subsystem"] == field(text, "Subsystem")
    assert info["epoch"] == int(field(text, "Epoch"))
    assert info["header_copy"] == "primary"
    assert info["cipher"] == field(text, "cipher")
    assert f"{info['sector_size']} [bytes]" == field(text, "sector")
    assert f"{info['payload_offset']} [bytes]" == field(text, "offset")
    ks = info["keyslots"][0]
    assert f"{ks['key_size']} bits" == field(text, "Key")
    assert ks["priority"] == field(text, "Priority")
    assert ks["cipher"] == field(text, "Cipher")
    assert f"{ks['cipher_key_size']} bits" == field(text, "Cipher key")
    assert ks["kdf"]["type"] == field(text, "PBKDF")
    if pbkdf == "pbkdf2":
        assert ks["kdf"]["iterations"] == int(field(text, "Iterations"))
        assert ks["kdf"]["hash"] == field(text, "Hash")
    else:
        assert ks["kdf"]["time"] == int(field(text, "Time cost"))
        assert ks["kdf"]["memory"] == int(field(text, "Memory"))
        assert ks["kdf"]["cpus"] == int(field(text, "Threads"))
    assert ks["kdf"]["salt"] == hexfield(text, "Salt")
    assert ks["af_stripes"] == int(field(text, "AF stripes"))
    assert ks["af_hash"] == field(text, "AF hash")
    assert f"{ks['area_offset']} [bytes]" == field(text, "Area offset")
    assert f"{ks['area_size']} [bytes]" == field(text, "Area length")
    assert f"{info['metadata_size'] - 2 * 16384} [bytes]" == field(text, "Keyslots area")


def test_luks1_agrees_with_luksdump(tmp_path: Path) -> None:
    made = luks_format(tmp_path, version=1, cipher="aes-cbc-essiv:sha256", key_bits=256,
                       hash="sha512", size=3 * MiB)
    info = inspect_json(str(made.payload))
    text = dump(made.payload)
    assert info["version"] == 1
    assert info["uuid"] == field(text, "UUID")
    assert info["cipher"] == f"{field(text, 'Cipher name')}-{field(text, 'Cipher mode')}"
    assert info["hash"] == field(text, "Hash spec")
    assert info["payload_offset"] == int(field(text, "Payload offset")) * 512
    assert info["key_size"] == int(field(text, "MK bits"))
    assert info["mk_digest"]["iterations"] == int(field(text, "MK iterations"))
    assert info["mk_digest"]["digest"] == hexfield(text, "MK digest")
    assert info["mk_digest"]["salt"] == hexfield(text, "MK salt")
    enabled = re.findall(r"Key Slot (\d): ENABLED", text)
    assert [k["id"] for k in info["keyslots"]] == [int(i) for i in enabled]
    ks = info["keyslots"][0]
    assert ks["kdf"]["iterations"] == int(field(text, "Iterations"))
    assert ks["area_offset"] == int(field(text, "Key material offset")) * 512
    assert ks["af_stripes"] == int(field(text, "AF stripes"))


def test_key_test_like_test_passphrase(tmp_path: Path) -> None:
    made = luks_format(tmp_path, detached=True, size=MiB)
    assert made.header
    good = tmp_path / "good"
    good.write_bytes(made.passphrase + b"\n")
    bad = tmp_path / "bad"
    bad.write_bytes(b"wrong\n")
    p = nbdluks(str(made.header), "--passphrase-file", str(good))
    assert p.returncode == 0 and "key slot 0 opened" in p.stdout
    info = inspect_json(str(made.header), "--passphrase-file", str(good))
    assert info["key_check"] == {"ok": True, "keyslot": 0, "source": str(made.header)}
    p = nbdluks(str(made.header), "--passphrase-file", str(bad))
    assert p.returncode == 1 and "no key slot matches this passphrase" in p.stdout
    # the passphrase never shows up
    assert "wrong" not in p.stdout + p.stderr
    vk = tmp_path / "vk"
    vk.write_bytes(made.key)
    p = nbdluks(str(made.header), "--volume-key-file", str(vk))
    assert p.returncode == 0 and "volume key matches" in p.stdout
    # cryptsetup agrees on the same passphrase
    subprocess.run(["cryptsetup", "open", "--test-passphrase", "--key-file",
                    str(tmp_path / "vol.pass"), str(made.header)], check=True)


def test_errors_name_the_flag_that_helps(tmp_path: Path) -> None:
    made = luks_format(tmp_path, detached=True, size=MiB, pbkdf="argon2id")
    assert made.header
    p = nbdluks(str(made.header), "--argon2-max-memory", "8")  # shown, the slot unusable
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert "0: argon2id, priority normal, UNUSABLE: key slot 0 kdf asks for" in p.stdout
    p = nbdluks(str(made.header), "--argon2-max-memory", "8", "--key-file",
                str(tmp_path / "vol.pass"))
    assert p.returncode == 1
    assert "above the cap of 8 KiB) (raise --argon2-max-memory" in p.stdout
    key = tmp_path / "short.key"
    key.write_bytes(b"0123")
    p = nbdluks(str(made.header), "--key-file", str(key), "--keyfile-size", "64")
    assert p.returncode == 1
    assert "holds 4 bytes, fewer than the 64 asked for (see --keyfile-size)" in p.stderr


@pytest.mark.parametrize("content", [b"", b"\0" * 4096, b"LUKS\xba\xbe\0\x02" + b"\0" * 100,
                                     b"LUKS\xba\xbe\0\x01" + b"x" * 50])
def test_bad_input_one_line_error(tmp_path: Path, content: bytes) -> None:
    p_ = tmp_path / "junk"
    p_.write_bytes(content)
    p = nbdluks(str(p_))
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert json.loads(p.stderr)["event"] == "fatal error"  # stderr is no terminal: JSON


def test_missing_file(tmp_path: Path) -> None:
    p = nbdluks(str(tmp_path / "nope"))
    assert p.returncode != 0 and "No such file" in p.stderr and "Traceback" not in p.stderr


def test_a_newline_at_the_end_of_the_secret_file_is_named(tmp_path: Path) -> None:
    # made by `cryptsetup --key-file` on a file with a newline: the newline is key
    made = luks_format(tmp_path, detached=True, size=MiB, passphrase=b"secret\n")
    assert made.header
    f = tmp_path / "vol.pass"
    p = nbdluks(str(made.header), "--passphrase-file", str(f))
    assert p.returncode == 1
    assert "drops the newline" in p.stdout and "use --key-file" in p.stdout
    assert nbdluks(str(made.header), "--key-file", str(f)).returncode == 0
    # made from a passphrase, opened with a key file that has a newline
    other = tmp_path / "o"
    other.mkdir()
    made2 = luks_format(other, detached=True, size=MiB, passphrase=b"secret")
    assert made2.header
    typed = tmp_path / "typed.txt"
    typed.write_bytes(b"secret\n")
    p = nbdluks(str(made2.header), "--key-file", str(typed))
    assert p.returncode == 1 and "try --passphrase-file" in p.stdout
    assert nbdluks(str(made2.header), "--passphrase-file", str(typed)).returncode == 0


def test_passphrase_from_a_terminal_is_prompted_without_echo(tmp_path: Path) -> None:
    import os
    import pty

    made = luks_format(tmp_path, detached=True, size=MiB, passphrase=b"tty secret")
    assert made.header
    pid, fd = pty.fork()
    if pid == 0:  # the child: nbdluks with the pty as its terminal
        os.execv(sys.executable, [sys.executable, "-m", "nbdluks", "inspect", str(made.header),
                                  "--passphrase-file", "-", "--log-format", "console"])
    out = b""
    while b"passphrase" not in out:
        out += os.read(fd, 1024)
    os.write(fd, b"tty secret\n")
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child is gone
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Enter passphrase" in text and "Key OK" in text
    assert "tty secret" not in text  # never echoed
