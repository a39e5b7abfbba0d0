"""`nbdluks format`, judged by cryptsetup (luksDump, open --test-passphrase),
by an independent sector reader, and by nbdkit's luks filter and qemu."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import need, pattern, run
from tests.luks.reference import crypt, luks_format
from tests.manage.conftest import ARGON2, PBKDF2, MiB, cli, digest, dump, keyfile, opens

KDFS = {"argon2id": ARGON2, "argon2i": ("--pbkdf", "argon2i", *ARGON2[2:]), "pbkdf2": PBKDF2}


def _payload(tmp: Path, size: int = 32 * MiB, name: str = "payload") -> Path:
    path = tmp / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize(("version", "kdf"), [("luks2", "argon2id"), ("luks2", "argon2i"),
                                              ("luks2", "pbkdf2"), ("luks1", "pbkdf2")])
def test_detached_header_on_any_source_opens_in_cryptsetup(
        tmp_path: Path, source: Callable[..., str], version: str, kdf: str) -> None:
    payload = _payload(tmp_path)
    header = tmp_path / "header"
    with open(header, "wb") as f:
        f.truncate(16 * MiB)
    key, wrong = keyfile(tmp_path, "pw"), keyfile(tmp_path, "wrong")
    uuid = "8a8f3e4c-1d2b-4c5a-9e6f-7a8b9c0d1e2f"
    out = cli("format", "--type", version, "--header", source(header), "--payload", payload,
              "--key-file", key, "--uuid", uuid, *KDFS[kdf]).stdout
    assert f"{version.upper()} volume {uuid} formatted: key slot 0, data at 0 bytes" in out
    text = dump(header)
    assert f"UUID:          \t{uuid}" in text
    assert (kdf if version == "luks2" else "Hash spec:     \tsha256") in text
    assert opens(header, key, payload)
    assert not opens(header, wrong, payload)


def _layout(text: str) -> list[str]:
    """What luksDump says about the layout (not salts, digests, UUIDs)."""
    keep = ("Version", "Metadata area", "Keyslots area", "offset:", "sector:", "cipher:",
            "Area offset", "Area length", "Payload offset", "Key material offset", "MK bits",
            "Cipher name", "Cipher mode", "Hash spec", "Key:", "AF stripes", "AF hash")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(keep)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("extra", [(), ("--sector-size", "4096", "--key-size", "256"),
                                   ("--luks2-metadata-size", "65536", "--offset", "8192"),
                                   ("--luks2-keyslots-size", "1048576",
                                    "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256")])
def test_layout_is_cryptsetups(tmp_path: Path, version: int, extra: tuple[str, ...]) -> None:
    if version == 1 and any(o.startswith("--luks2") or o == "--sector-size" for o in extra):
        pytest.skip("LUKS2 options")
    key = keyfile(tmp_path, "pw")
    ours = _payload(tmp_path, name="ours")
    cli("format", "--type", f"luks{version}", "--payload", ours, "--key-file", key,
        *PBKDF2, *extra)
    theirs = _payload(tmp_path, name="theirs")
    run(["cryptsetup", "luksFormat", "-q", "--type", f"luks{version}", "--key-file", str(key),
         *PBKDF2, *extra, str(theirs)])
    assert _layout(dump(ours)) == _layout(dump(theirs))
    assert opens(ours, key)


def test_label_subsystem_and_a_given_volume_key(tmp_path: Path) -> None:
    payload, key = _payload(tmp_path), keyfile(tmp_path, "pw")
    vk = keyfile(tmp_path, "vk", bytes(range(64)))
    cli("format", "--payload", payload, "--key-file", key, "--label", "data",
        "--subsystem", "nbd", "--volume-key-file", vk, *ARGON2)
    text = dump(payload)
    assert "Label:         \tdata" in text and "Subsystem:     \tnbd" in text
    assert opens(payload, key)
    # the volume key is the one given: cryptsetup accepts it directly
    run(["cryptsetup", "open", "--test-passphrase", "--volume-key-file", str(vk), str(payload)])


def test_default_kdf_is_calibrated_argon2id(tmp_path: Path) -> None:
    payload, key = _payload(tmp_path), keyfile(tmp_path, "pw")
    cli("format", "--payload", payload, "--key-file", key, "--iter-time", "200",
        "--pbkdf-memory", "65536")
    text = dump(payload)
    assert "PBKDF:      argon2id" in text
    cost = int(re.search(r"Time cost:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    memory = int(re.search(r"Memory:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    assert cost >= 4 and 32 <= memory <= 65536
    assert opens(payload, key)


def test_written_through_serve_decrypts_with_an_independent_reader(
        tmp_path: Path, nbdluks: Callable[..., object]) -> None:
    need("nbdcopy")
    payload, key = _payload(tmp_path), keyfile(tmp_path, "pw")
    vk = keyfile(tmp_path, "vk", pattern(64, seed=7))
    cli("format", "--payload", payload, "--key-file", key, "--sector-size", "4096",
        "--volume-key-file", vk, *PBKDF2)
    served = nbdluks("--payload", str(payload), "--passphrase-file", str(key))
    data = pattern(MiB, seed=3)
    (tmp_path / "data").write_bytes(data)
    run(["nbdcopy", "--flush", str(tmp_path / "data"), served.uri])  # type: ignore[attr-defined]
    served.stop()  # type: ignore[attr-defined]
    with open(payload, "rb") as f:
        f.seek(16 * MiB)
        ct = f.read(MiB)
    assert crypt(ct, "aes-xts-plain64", vk.read_bytes(), 4096, encrypt=False) == data


def test_luks1_is_read_by_nbdkit_and_qemu(tmp_path: Path) -> None:
    need("nbdkit", "qemu-img", "nbdcopy")
    payload = _payload(tmp_path, 8 * MiB)
    key = keyfile(tmp_path, "pw")
    cli("format", "--type", "luks1", "--payload", payload, "--key-file", key, *PBKDF2)
    data = pattern(4 * MiB, seed=5)
    src = tmp_path / "plain"
    src.write_bytes(data)
    # qemu writes the plaintext through its own LUKS driver
    run(["qemu-img", "convert", "-n", "--object", f"secret,id=s,file={key}", "--target-image-opts",
         "-f", "raw", str(src), f"driver=luks,key-secret=s,file.filename={payload}"])
    out = tmp_path / "out"
    run(["nbdkit", "-U", "-", "--filter=luks", "file", str(payload), "passphrase=pw", "--run",
         f"nbdcopy $uri {out}"])
    assert out.read_bytes()[: len(data)] == data


def test_existing_header_is_kept_without_force(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=32 * MiB)
    key = keyfile(tmp_path, "pw")
    before = digest(made.payload)
    p = cli("format", "--payload", made.payload, "--key-file", key, *PBKDF2, check=False)
    assert p.returncode == 1 and "already holds a LUKS header" in p.stderr
    assert digest(made.payload) == before
    cli("format", "--payload", made.payload, "--key-file", key, "--force", *PBKDF2)
    assert opens(made.payload, key)


@pytest.mark.parametrize(("args", "status", "message"), [
    (("--offset", "1", "--sector-size", "4096"), 2, "not a multiple of the 4096-byte sector"),
    (("--offset", "1"), 1, "inside the LUKS2 metadata"),
    (("--sector-size", "1000"), 2, "sector size 1000"),
    (("--key-size", "264"), 2, "33-byte key is not valid"),
    (("--key-size", "100"), 2, "a multiple of 8"),
    (("--uuid", "nope"), 2, "wrong LUKS UUID format"),
    (("--type", "luks1", "--pbkdf", "argon2id"), 2, "LUKS1 key slots use pbkdf2 only"),
    (("--pbkdf-memory", "1"), 2, "Argon2 memory must be"),
    (("--luks2-metadata-size", "5000"), 2, "metadata size 5000"),
    (("--hash", "shake128"), 2, "hash 'shake128' is not available here"),
    (("--hash", "nonsense"), 2, "hash 'nonsense' is not available here"),
    (("--label", "x" * 48), 2, "the label is 48 bytes long, at most 47 fit"),
    (("--pbkdf-force-iterations", "2147483648"), 2, "must be 1000 to 2147483647"),
    (("--uuid", "{8a8f3e4c-1d2b-4c5a-9e6f-7a8b9c0d1e2f}"), 2, "wrong LUKS UUID format"),
    (("--cipher", "aes-cbc-essiv:shake128", "--key-size", "256"), 2, "essiv hash"),
    (("--offset", "131072"), 1, "payload holds"),
])
def test_bad_options_are_one_line_and_write_nothing(
        tmp_path: Path, args: tuple[str, ...], status: int, message: str) -> None:
    payload, key = _payload(tmp_path), keyfile(tmp_path, "pw")
    p = cli("format", "--payload", payload, "--key-file", key, *PBKDF2, *args, check=False)
    assert p.returncode == status, p.stderr
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert payload.read_bytes() == bytes(32 * MiB)


def test_read_only_source_is_refused(tmp_path: Path, source: Callable[..., str]) -> None:
    header, payload = _payload(tmp_path, 16 * MiB, "header"), _payload(tmp_path)
    key = keyfile(tmp_path, "pw")
    spec = source(header, read_only=True)
    if "://" not in spec:
        pytest.skip("root writes any local file")
    p = cli("format", "--header", spec, "--payload", payload, "--key-file", key, *PBKDF2,
            check=False)
    assert p.returncode == 1 and "read-only" in p.stderr, p.stderr
    assert header.read_bytes() == bytes(16 * MiB)


def test_passphrase_is_asked_twice_on_a_terminal(tmp_path: Path) -> None:
    payload = _payload(tmp_path)
    script = (f"import pty, os, sys\npid, fd = pty.fork()\nif pid == 0:\n"
              f"    os.execv(sys.executable, [sys.executable, '-m', 'nbdluks', 'format', "
              f"'--payload', '{payload}', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', "
              f"'1000', '--log-level', 'warning'])\n"
              "out = b''\nfor answer in (b'typed\\n', b'typed\\n'):\n"
              "    while b'passphrase: ' not in out:\n        out += os.read(fd, 100)\n"
              "    out = b''\n    os.write(fd, answer)\n"
              "print(os.waitpid(pid, 0)[1] >> 8)\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.stdout.strip().endswith("0"), p
    assert opens(payload, keyfile(tmp_path, "typed"))


def test_a_header_with_only_its_secondary_copy_is_kept_too(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=32 * MiB)
    with open(made.payload, "r+b") as f:
        f.write(bytes(4096))  # the primary gone: cryptsetup still opens the secondary
    assert opens(made.payload, tmp_path / "vol.pass")
    p = cli("format", "--payload", made.payload, "--key-file", keyfile(tmp_path, "pw"),
            *PBKDF2, check=False)
    assert p.returncode == 1 and "already holds a LUKS header" in p.stderr
    assert opens(made.payload, tmp_path / "vol.pass")


@pytest.mark.parametrize("version", [1, 2])
def test_the_hash_asked_for_is_the_headers(tmp_path: Path, version: int) -> None:
    payload, key = _payload(tmp_path), keyfile(tmp_path, "pw")
    cli("format", "--type", f"luks{version}", "--payload", payload, "--key-file", key,
        "--hash", "sha512", *PBKDF2)
    theirs = _payload(tmp_path, name="theirs")
    run(["cryptsetup", "luksFormat", "-q", "--type", f"luks{version}", "--key-file", str(key),
         "--hash", "sha512", *PBKDF2, str(theirs)])
    hashes = [line.strip() for line in dump(payload).splitlines()
              if "sha" in line and ("Hash" in line or "AF hash" in line)]
    assert hashes and all("sha512" in h for h in hashes), hashes
    assert hashes == [line.strip() for line in dump(theirs).splitlines()
                      if "sha" in line and ("Hash" in line or "AF hash" in line)]
    assert opens(payload, key)


def test_a_stopped_format_fails_and_writes_nothing(tmp_path: Path) -> None:
    """SIGINT during the KDF benchmark: exit 130, not a success; the header
    file the format created is gone again."""
    payload, key = _payload(tmp_path), keyfile(tmp_path, "pw")
    header = tmp_path / "new.hdr"
    proc = subprocess.Popen([sys.executable, "-m", "nbdluks", "format", "--header", str(header),
                             "--payload", str(payload), "--key-file", str(key), "--iter-time",
                             "20000", "--pbkdf", "pbkdf2"], stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not header.exists() and payload.read_bytes() == bytes(32 * MiB)
