"""`nbdluks reencrypt`, judged by cryptsetup 2.6.1 and an independent
decryption: the volume key changes, every byte reads back, and either tool
finishes what the other began (stopped, or killed -9 in the middle of a
step), as the on-disk protocol promises."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Upstream, pattern, run
from tests.luks.reference import Made, crypt, dump_offset, fill, luks_format
from tests.luks.test_reencryption import interrupted, volume_key
from tests.manage.conftest import MiB, cli

SIZE = 40 * MiB  # 24 MiB of data after the 16 MiB header


def made_with_data(tmp: Path, name: str = "vol", **kw: object) -> tuple[Made, bytes]:
    made = luks_format(tmp, size=SIZE, name=name, **kw)  # type: ignore[arg-type]
    data = pattern(SIZE - made.offset, seed=11)
    fill(made, data)
    return made, data


def reencrypt(made: Made, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli("reencrypt", "--payload", made.payload, "--key-file",
               made.payload.with_suffix(".pass"), *args, check=check)


def final_plaintext(made: Made, length: int) -> tuple[bytes, bytes]:
    """(the volume key, the data) as cryptsetup's final header says."""
    dump = run(["cryptsetup", "luksDump", str(made.payload)]).stdout
    assert "online-reencrypt" not in dump and "reencrypt" not in dump.split("Tokens:")[0]
    key = volume_key(made.payload, made.payload.with_suffix(".pass"))
    offset, ss = dump_offset(made.payload)
    cipher = dump.split("cipher:", 1)[1].split()[0]
    with open(made.payload, "rb") as f:
        f.seek(offset)
        return key, crypt(f.read(length), cipher, key, ss, encrypt=False)


def cryptsetup_resume(made: Made) -> None:
    key = str(made.payload.with_suffix(".pass"))
    if "in-reencryption" in run(["cryptsetup", "luksDump", "--debug-json",
                                 str(made.payload)]).stdout:
        run(["cryptsetup", "repair", "-q", "--key-file", key, str(made.payload)])
    run(["cryptsetup", "reencrypt", "--resume-only", "--force-offline-reencrypt", "-q",
         "--key-file", key, str(made.payload)], timeout=300)


@pytest.mark.parametrize("resilience", ["checksum", "journal", "none"])
def test_the_key_changes_and_every_byte_reads_back(tmp_path: Path, resilience: str) -> None:
    made, data = made_with_data(tmp_path)
    out = reencrypt(made, "--resilience", resilience, "--hotzone-size", "1M")
    assert "reencryption finished" in out.stdout
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and len(key) == len(made.key)
    assert plain == data
    run(["cryptsetup", "open", "--test-passphrase", "--key-file",
         str(made.payload.with_suffix(".pass")), str(made.payload)])


def test_a_new_sector_size_and_key_size(tmp_path: Path) -> None:
    made, data = made_with_data(tmp_path)
    reencrypt(made, "--sector-size", "512", "--key-size", "256")
    key, plain = final_plaintext(made, len(data))
    assert len(key) == 32 and plain == data
    assert dump_offset(made.payload)[1] == 512


def test_a_detached_header(tmp_path: Path) -> None:
    made, data = made_with_data(tmp_path, detached=True)
    assert made.header is not None
    cli("reencrypt", "--header", made.header, "--payload", made.payload, "--key-file",
        made.payload.with_suffix(".pass"), "--hotzone-size", "2M")
    key = volume_key(made.header, made.payload.with_suffix(".pass"))
    assert key != made.key
    offset, ss = dump_offset(made.header)
    with open(made.payload, "rb") as f:
        f.seek(offset)
        assert crypt(f.read(len(data)), made.cipher, key, ss, encrypt=False) == data


def _run_then(made: Made, sig: int, until: str) -> int:
    """Start a slow reencryption, send `sig` once `until` is logged (and a
    moment more); its exit status."""
    cmd = [sys.executable, "-m", "nbdluks", "reencrypt", "--payload", str(made.payload),
           "--key-file", str(made.payload.with_suffix(".pass")), "--hotzone-size", "64K",
           "--log-format", "json", "--log-level", "debug"]
    log = made.payload.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    while until not in log.read_text():
        assert proc.poll() is None, log.read_text()
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(sig)
    return proc.wait(60)


@pytest.mark.parametrize("finisher", ["cryptsetup", "nbdluks"])
def test_a_stopped_reencryption_is_finished_by_either(tmp_path: Path, finisher: str) -> None:
    made, data = made_with_data(tmp_path)
    assert _run_then(made, signal.SIGTERM, "hotzone done") == 0  # a stop is not a failure
    assert "online-reencrypt-v2" in run(["cryptsetup", "luksDump", str(made.payload)]).stdout
    if finisher == "cryptsetup":
        cryptsetup_resume(made)
    else:
        assert "finished" in reencrypt(made, "--resume-only").stdout
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and plain == data


@pytest.mark.parametrize("finisher", ["cryptsetup", "nbdluks"])
def test_a_killed_reencryption_is_recovered_by_either(tmp_path: Path, finisher: str) -> None:
    """kill -9 at a random moment, often in the middle of a step: the
    interrupted step is recovered from its checksums, by either tool."""
    made, data = made_with_data(tmp_path)
    assert _run_then(made, signal.SIGKILL, "hotzone") == -9
    if finisher == "cryptsetup":
        cryptsetup_resume(made)
    else:
        reencrypt(made, "--resume-only")
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and plain == data


def test_nbdluks_finishes_what_cryptsetup_began(tmp_path: Path) -> None:
    for i, delay in enumerate((0.5, 0.3, 0.8)):
        made, data = made_with_data(tmp_path, name=f"v{i}")
        if interrupted(made, "checksum", delay, signal.SIGINT):
            break
    else:
        pytest.skip("cryptsetup finished before every interruption")
    assert "finished" in reencrypt(made, "--resume-only").stdout
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and plain == data


def test_refusals_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    made, _ = made_with_data(tmp_path)
    before = made.payload.read_bytes()[: 16 * MiB]
    (tmp_path / "wrong").write_bytes(b"wrong")
    bad = cli("reencrypt", "--payload", made.payload, "--key-file", tmp_path / "wrong",
              check=False)
    assert bad.returncode == 1 and "no key slot matches" in bad.stderr
    assert "not being reencrypted" in reencrypt(made, "--resume-only", check=False).stderr
    # a second key slot the key does not open would be lost: name the one to keep
    (tmp_path / "other").write_bytes(b"other")
    run(["cryptsetup", "luksAddKey", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
         "1000", "--key-file", str(made.payload.with_suffix(".pass")), str(made.payload),
         str(tmp_path / "other")])
    before = made.payload.read_bytes()[: 16 * MiB]
    p = reencrypt(made, check=False)
    assert p.returncode == 1 and "key slots 1 do not open" in p.stderr
    assert made.payload.read_bytes()[: 16 * MiB] == before
    luks1 = luks_format(tmp_path, version=1, name="l1")
    p = reencrypt(luks1, check=False)
    assert p.returncode == 1 and "only LUKS2" in p.stderr
    p = cli("reencrypt", "--payload", made.payload, "--key-file", tmp_path / "wrong",
            "--resilience", "fast", check=False)
    assert p.returncode == 2


def test_init_only_then_inspect_then_resume(tmp_path: Path) -> None:
    made, data = made_with_data(tmp_path)
    out = reencrypt(made, "--init-only", "--sector-size", "512", "--resilience", "journal")
    assert "nothing rewritten" in out.stdout
    shown = cli("inspect", made.payload).stdout
    assert "Reencryption:   reencrypt, forward, resilience journal" in shown
    assert "parameters: aes-xts-plain64, sector size 4096 -> aes-xts-plain64, sector size 512" \
        in shown
    assert "reencrypt (the reencryption's resilience area, no key)" in shown
    # cryptsetup reads the state nbdluks wrote as its own
    assert "online-reencrypt-v2" in run(["cryptsetup", "luksDump", str(made.payload)]).stdout
    assert "finished" in reencrypt(made, "--resume-only").stdout
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and plain == data and dump_offset(made.payload)[1] == 512


def test_header_and_payload_on_nbd_servers(tmp_path: Path, upstreams: list[Upstream]) -> None:
    """The header behind nbdkit, the payload behind qemu-nbd: a reencryption
    over NBD alone (FLUSH for every sync), started, then resumed."""
    made, data = made_with_data(tmp_path, detached=True)
    assert made.header is not None
    hdr = Upstream("nbdkit", made.header, tmp_path, tcp=False)
    pay = Upstream("qemu-nbd", made.payload, tmp_path, tcp=False)
    upstreams += [hdr, pay]
    args = ["reencrypt", "--header", hdr.uri, "--payload", pay.uri, "--key-file",
            str(made.payload.with_suffix(".pass")), "--hotzone-size", "1M"]
    cli(*args, "--init-only")
    assert "finished" in cli(*args, "--resume-only").stdout
    for u in (hdr, pay):
        u.stop()
    key = volume_key(made.header, made.payload.with_suffix(".pass"))
    offset, ss = dump_offset(made.header)
    with open(made.payload, "rb") as f:
        f.seek(offset)
        assert key != made.key
        assert crypt(f.read(len(data)), made.cipher, key, ss, encrypt=False) == data


@pytest.mark.parametrize("kdf", [("pbkdf2", "--pbkdf-force-iterations", "1234"),
                                 ("argon2id", "--pbkdf-force-iterations", "5",
                                  "--pbkdf-memory", "64", "--pbkdf-parallel", "1")])
def test_the_new_key_slots_take_the_pbkdf_asked_for(tmp_path: Path, kdf: tuple[str, ...]
                                                     ) -> None:
    made, data = made_with_data(tmp_path)
    reencrypt(made, "--pbkdf", *kdf)
    md = json.loads(run(["cryptsetup", "luksDump", "--dump-json-metadata",
                         str(made.payload)]).stdout)
    (slot,) = md["keyslots"].values()
    assert slot["kdf"]["type"] == kdf[0]
    if kdf[0] == "pbkdf2":
        assert slot["kdf"]["iterations"] == 1234
    else:
        assert (slot["kdf"]["time"], slot["kdf"]["memory"], slot["kdf"]["cpus"]) == (5, 64, 1)
    key, plain = final_plaintext(made, len(data))
    assert key != made.key and plain == data
