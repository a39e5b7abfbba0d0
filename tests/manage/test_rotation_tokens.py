"""A rotation keeps Tang bindings: the new key slots get the old ones'
passphrases and tokens (as cryptsetup's reencrypt), so that real clevis
(`luks list`, `luks pass`) and cryptsetup agree at the end, and a volume
bound to Tang only rotates and serves with no secret on the host."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import run
from tests.luks.reference import Made, crypt, dump_offset
from tests.luks.test_reencryption import volume_key
from tests.manage.conftest import PBKDF2, cli, keyfile, opens
from tests.manage.test_online import forked_by_a_threadless_helper
from tests.manage.test_reencrypt import made_with_data
from tests.unlock.test_tokens import Tang


def bound(tmp: Path, tang: Callable[[str], Tang], *, tang_only: bool
          ) -> tuple[Made, bytes, Tang]:
    """A LUKS2 volume with data, key slot 1 bound to a Tang server (token 0),
    and slot 0's passphrase removed when `tang_only`."""
    made, data = made_with_data(tmp)
    server = tang("a")
    passphrase = made.payload.with_suffix(".pass")
    cli("bind", "tang", json.dumps({"url": server.url}), "-y", "--payload", made.payload,
        "--key-file", passphrase, *PBKDF2)
    if tang_only:
        run(["cryptsetup", "luksRemoveKey", "-q", "--key-file", str(passphrase),
             str(made.payload)])
    return made, data, server


def metadata(path: Path) -> dict[str, Any]:
    out = run(["cryptsetup", "luksDump", "--dump-json-metadata", str(path)]).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def check_rotated(tmp: Path, made: Made, data: bytes, server: Tang, old_slots: set[str]
                  ) -> tuple[str, Path]:
    """cryptsetup and clevis agree: one segment, no requirement, the token
    names only the new slot bound to the new key; clevis recovers a
    passphrase that cryptsetup opens; the data decrypts with the new key.
    The new Tang slot and a file with its passphrase."""
    md = metadata(made.payload)
    assert "requirements" not in md["config"] and list(md["segments"]) == ["0"]
    assert not set(md["keyslots"]) & old_slots and len(md["digests"]) == 1
    assert all(v["type"] == "luks2" for v in md["keyslots"].values())
    (token,) = md["tokens"].values()
    (slot,) = token["keyslots"]
    assert token["type"] == "clevis" and slot in md["keyslots"]
    listed = run(["clevis", "luks", "list", "-d", str(made.payload)]).stdout.splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{slot}: tang '") \
        and server.url in listed[0], listed
    secret = run(["clevis", "luks", "pass", "-d", str(made.payload), "-s", slot]).stdout
    recovered = keyfile(tmp, f"recovered{slot}", secret.encode())
    assert opens(made.payload, recovered)
    key = volume_key(made.payload, recovered)
    offset, ss = dump_offset(made.payload)
    assert key != made.key
    with open(made.payload, "rb") as f:
        f.seek(offset)
        assert crypt(f.read(len(data)), made.cipher, key, ss, encrypt=False) == data
    return slot, recovered


def serve(made: Made, sock: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """nbdluks serving the volume with no key given: through its token."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbdluks", "serve", "--payload", str(made.payload),
             "-k", str(sock), "--log-format", "json", *extra],
            stdout=f, stderr=subprocess.STDOUT)
    while not sock.exists():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.02)
    return proc


def reads_through_tang(tmp: Path, made: Made, data: bytes, name: str) -> None:
    sock = tmp / f"{name}.sock"
    proc = serve(made, sock, tmp / f"{name}.log")
    try:
        run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(tmp / f"{name}.copy")])
        assert (tmp / f"{name}.copy").read_bytes() == data
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "unlocked through a token" in (tmp / f"{name}.log").read_text()


def test_a_tang_only_volume_rotates_offline_with_no_secret(
        tmp_path: Path, tang: Callable[[str], Tang]) -> None:
    made, data, server = bound(tmp_path, tang, tang_only=True)
    out = cli("reencrypt", "--payload", made.payload, "--init-only").stdout
    assert "nothing rewritten" in out
    mid = metadata(made.payload)
    assert [v["keyslots"] for v in mid["tokens"].values()] == [["1", "0"]]
    reads_through_tang(tmp_path, made, data, "mid")  # both keys through the token
    out = cli("reencrypt", "--payload", made.payload, "--resume-only",
              "--hotzone-size", "4M").stdout
    assert "reencryption finished" in out
    check_rotated(tmp_path, made, data, server, {"1"})
    reads_through_tang(tmp_path, made, data, "after")


def test_a_tang_only_volume_rotates_while_served(
        tmp_path: Path, tang: Callable[[str], Tang]) -> None:
    made, data, server = bound(tmp_path, tang, tang_only=True)
    sock, log = tmp_path / "sock", tmp_path / "log"
    proc = serve(made, sock, log, "--reencrypt", "--reencrypt-rate", "16",
                 "--hotzone-size", "1M", "--log-level", "debug")
    try:
        forked_by_a_threadless_helper(log, proc.pid)  # (Tang's requests ran on threads)
        deadline = time.monotonic() + 120
        while "reencryption finished" not in (text := log.read_text()):
            # a reencryption that died says why here, not in a tail of reads
            assert '"reencryption failed' not in text, text[text.index('"reencryption failed'):]
            run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(tmp_path / "copy")])
            assert (tmp_path / "copy").read_bytes() == data
            assert time.monotonic() < deadline, text[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    check_rotated(tmp_path, made, data, server, {"1"})
    reads_through_tang(tmp_path, made, data, "after")


def test_a_passphrase_and_a_tang_binding_are_both_carried(
        tmp_path: Path, tang: Callable[[str], Tang]) -> None:
    """With the passphrase given, the Tang-bound slot it does not open is
    carried through its token (it used to need --key-slot, and was lost)."""
    made, data, server = bound(tmp_path, tang, tang_only=False)
    passphrase = made.payload.with_suffix(".pass")
    cli("reencrypt", "--payload", made.payload, "--key-file", passphrase)
    slot, _ = check_rotated(tmp_path, made, data, server, {"0", "1"})
    assert opens(made.payload, passphrase)
    assert len(metadata(made.payload)["keyslots"]) == 2
    check = json.loads(cli("inspect", made.payload, "--token-only", "--json").stdout)
    assert check["key_check"]["keyslot"] == int(slot)
