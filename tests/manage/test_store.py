"""The header store: a change made by someone else between our read and
our write is refused, on a file (after cryptsetup released its lock) and
on an NBD export (no lock there: the seqid, or LUKS1's whole binary
header, is read again before the first write)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from nbdluks.luks import Sync, Write
from nbdluks.manage import ConcurrentChangeError
from nbdluks.manage.store import HeaderStore
from nbdluks.nbd import UpstreamOptions
from tests.luks.reference import add_key, luks_format
from tests.manage.conftest import MiB, digest, keyfile


@pytest.mark.parametrize("version", [1, 2])
def test_a_concurrent_change_is_refused(tmp_path: Path, source: Callable[..., str],
                                        version: int) -> None:
    made = luks_format(tmp_path, version=version, size=32 * MiB, detached=True)
    src = source(made.header_path)
    store = HeaderStore.open(src, UpstreamOptions())
    try:
        store.read(1 << 20)
        if store.lock_fd is not None:  # cryptsetup would wait for our lock: let it in
            import os
            os.close(store.lock_fd)
            store.lock_fd = None
        add_key(made.header_path, tmp_path / "vol.pass", keyfile(tmp_path, "theirs"))
        after = digest(made.header_path)
        with pytest.raises(ConcurrentChangeError, match="changed while this command ran"):
            store.apply([Write(0, b"x" * 512), Sync()])
        assert digest(made.header_path) == after
    finally:
        store.close()


def test_racing_changes_on_an_nbd_store_never_claim_a_lost_key(tmp_path: Path) -> None:
    """Two add-keys at once on a header behind nbdkit whose writes take
    150 ms (no lock on NBD): whichever reports success has its key working;
    one that another change overtook says so instead of claiming success."""
    import subprocess
    import sys
    import time

    from tests.conftest import need, wait_listening
    from tests.manage.conftest import PBKDF2, opens

    need("nbdkit")
    made = luks_format(tmp_path, size=32 * MiB, detached=True)
    sock = tmp_path / "slow.sock"
    nbdkit = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock),
                               "--filter=delay", "file", str(made.header_path),
                               "delay-write=150ms"])
    try:
        wait_listening(nbdkit, str(sock), None, tmp_path / "nbdkit.log")
        keys = [keyfile(tmp_path, f"racer{i}") for i in range(2)]
        procs = []
        for key in keys:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "nbdluks", "add-key", "--header",
                 f"nbd+unix:///?socket={sock}", "--key-file", str(tmp_path / "vol.pass"),
                 "--new-key-file", str(key), *PBKDF2], stderr=subprocess.PIPE, text=True))
            time.sleep(0.04)
        results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    finally:
        nbdkit.kill()
        nbdkit.wait()
    assert opens(made.header_path, tmp_path / "vol.pass", made.payload)
    for key, (status, err) in zip(keys, results, strict=True):
        if status == 0:
            assert opens(made.header_path, key, made.payload), "a success whose key is lost"
        else:
            assert "changed while" in err or "interfered" in err, err
