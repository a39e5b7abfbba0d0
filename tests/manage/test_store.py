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
