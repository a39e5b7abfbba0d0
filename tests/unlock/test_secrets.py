from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdluks.unlock.secrets import SecretError, ends_in_newline, read_secret


def test_passphrase_file_is_its_first_line(tmp_path: Path) -> None:
    f = tmp_path / "p"
    f.write_bytes(b"pass word\nsecond line\n")
    assert read_secret(str(f), first_line=True) == bytearray(b"pass word")
    f.write_bytes(b"no newline")
    assert read_secret(str(f), first_line=True) == bytearray(b"no newline")


def test_key_file_exact_bytes_offset_size(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_bytes(bytes(range(256)) * 4)
    assert read_secret(str(f)) == bytearray(bytes(range(256)) * 4)
    assert read_secret(str(f), offset=10, size=5) == bytearray(range(10, 15))
    with pytest.raises(SecretError, match="fewer than the 100 asked for"):
        read_secret(str(f), offset=1000, size=100)
    with pytest.raises(SecretError, match="shorter than the key file offset"):
        read_secret(str(f), offset=5000)


def test_fd_and_errors_never_show_content(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"from a pipe\n")
    os.close(w)
    assert read_secret(f"/dev/fd/{r}", first_line=True) == bytearray(b"from a pipe")
    os.close(r)
    empty = tmp_path / "e"
    empty.write_bytes(b"")
    with pytest.raises(SecretError, match="empty"):
        read_secret(str(empty))
    with pytest.raises(SecretError, match="cannot open") as e:
        read_secret(str(tmp_path / "missing"))
    assert "missing" in str(e.value)


def test_a_fifo_is_not_opened_again_to_look_for_a_newline(tmp_path: Path) -> None:
    """The hint after a wrong key looks at the key file's last byte: a FIFO
    (read once already) would block that look forever."""
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    assert ends_in_newline(str(fifo)) is False
