"""`nbdluks bind` / `unbind`, judged by clevis (luks list, pass, unbind),
cryptsetup and nbdluks' own token unlock, against real tangd servers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.conftest import run
from tests.luks.reference import luks_format
from tests.manage.conftest import ARGON2, PBKDF2, MiB, cli, digest, dump, keyfile, opens
from tests.unlock.test_tokens import Tang


def thp(t: Tang) -> str:
    return run(["sh", "-c", f"curl -s {t.url}/adv | jose fmt -j- -g payload -y -o- | "
                "jose jwk use -i- -r -u verify -o- | jose jwk thp -i- -a S256"]).stdout.strip()


def test_a_binding_is_what_clevis_lists_passes_and_unbinds(
        tmp_path: Path, source: Callable[..., str], tang: Callable[[str], Tang]) -> None:
    made = luks_format(tmp_path, size=32 * MiB, detached=True)
    key = tmp_path / "vol.pass"
    server = tang("a")
    cfg = json.dumps({"url": server.url, "thp": thp(server)})
    out = cli("bind", "tang", cfg, "--header", source(made.header_path), "--key-file", key,
              *PBKDF2).stdout
    assert "bound to tang: token 0, key slot 1" in out
    listed = run(["clevis", "luks", "list", "-d", str(made.header_path)]).stdout
    assert listed.startswith("1: tang '") and server.url in listed
    # clevis recovers the slot's passphrase from Tang; cryptsetup opens with it
    secret = run(["clevis", "luks", "pass", "-d", str(made.header_path), "-s", "1"]).stdout
    assert opens(made.header_path, keyfile(tmp_path, "recovered", secret.encode()),
                 made.payload)
    # nbdluks opens it through the token, with no key given
    check = cli("inspect", made.header_path, "--token-only", "--json").stdout
    assert json.loads(check)["key_check"]["keyslot"] == 1
    run(["clevis", "luks", "unbind", "-f", "-d", str(made.header_path), "-s", "1"])
    assert "Tokens:\n" in dump(made.header_path) and "clevis" not in dump(made.header_path)
    assert opens(made.header_path, key, made.payload)


def test_sss_binding_and_unbind(tmp_path: Path, tang: Callable[[str], Tang]) -> None:
    made = luks_format(tmp_path, size=32 * MiB)
    key = tmp_path / "vol.pass"
    a, b = tang("a"), tang("b")
    cfg = json.dumps({"t": 1, "pins": {"tang": [{"url": a.url}, {"url": b.url}]}})
    cli("bind", "sss", cfg, "--payload", made.payload, "--key-file", key, "-y", *ARGON2)
    assert run(["clevis", "luks", "list", "-d", str(made.payload)]).stdout.startswith(
        "1: sss '")
    a.stop()  # one of two is enough
    check = json.loads(cli("inspect", made.payload, "--token-only", "--json").stdout)
    assert check["key_check"]["ok"]
    out = cli("unbind", "--token-id", "0", "--payload", made.payload).stdout
    assert "token 0 and key slot 1 removed" in out
    assert "luks2" in dump(made.payload) and '"1"' not in dump(made.payload)
    p = cli("inspect", made.payload, "--token-only", check=False)
    assert p.returncode == 1


def test_a_clevis_binding_unlocks_an_add_key(tmp_path: Path, tang: Callable[[str], Tang]
                                             ) -> None:
    """The existing key may come from a token, as `serve` takes it."""
    made = luks_format(tmp_path, size=32 * MiB)
    server = tang("a")
    run(["clevis", "luks", "bind", "-y", "-d", str(made.payload), "-k",
         str(tmp_path / "vol.pass"), "tang", json.dumps({"url": server.url})], timeout=120)
    new = keyfile(tmp_path, "new")
    cli("add-key", "--payload", made.payload, "--token-only", "--new-key-file", new, *PBKDF2)
    assert opens(made.payload, new)


def test_untrusted_advertisement_and_luks1_are_refused_writing_nothing(
        tmp_path: Path, tang: Callable[[str], Tang]) -> None:
    server = tang("a")
    made = luks_format(tmp_path, size=32 * MiB)
    before = digest(made.payload)
    p = cli("bind", "tang", json.dumps({"url": server.url}), "--payload", made.payload,
            "--key-file", tmp_path / "vol.pass", *PBKDF2, check=False)
    assert p.returncode == 1 and "thumbprint" in p.stderr.lower(), p.stderr
    l1 = luks_format(tmp_path, version=1, size=32 * MiB, name="l1")
    p = cli("bind", "tang", json.dumps({"url": server.url}), "-y", "--payload", l1.payload,
            "--key-file", tmp_path / "l1.pass", *PBKDF2, check=False)
    assert p.returncode == 1 and "LUKS2 volumes only" in p.stderr
    p = cli("unbind", "--token-id", "3", "--payload", made.payload, check=False)
    assert p.returncode == 1 and "token 3 does not exist" in p.stderr
    assert digest(made.payload) == before
