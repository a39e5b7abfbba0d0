"""Reading secrets from files, file descriptors or standard input.

Secrets are returned as bytearrays the caller wipes; they are never taken
from the command line and never appear in messages.
"""

from __future__ import annotations

import os
import stat
import sys
import termios

from ..errors import NbdluksError

# cryptsetup's default limit for key files.
MAX_KEYFILE = 8 * 1024 * 1024


class SecretError(NbdluksError):
    """A secret that cannot be read or has the wrong shape."""


class KeyFileShortError(SecretError):
    """A key file holds fewer bytes than the size asked for."""

    def __init__(self, path: str, held: int, size: int) -> None:
        super().__init__(f"key file {path} holds {held} bytes, fewer than the {size} asked for")
        self.path = path
        self.held = held
        self.size = size


def read_secret(path: str, *, offset: int = 0, size: int | None = None,
                first_line: bool = False, prompt: str = "Enter passphrase: ") -> bytearray:
    """Read a secret. `first_line`: a passphrase file, up to its first newline."""
    buf = _read(path, offset, MAX_KEYFILE if size is None else size, prompt)
    if first_line:
        nl = buf.find(b"\n")
        if nl >= 0:
            buf[nl:] = b""
    elif size is not None:
        if len(buf) < size:
            n = len(buf)
            buf[:] = bytes(len(buf))
            raise KeyFileShortError(path, n, size)
        buf[size:] = b""
    elif len(buf) > MAX_KEYFILE:
        raise SecretError(f"key file {path} is larger than {MAX_KEYFILE} bytes")
    if not buf:
        raise SecretError(f"secret file {path} is empty")
    return buf


def ends_in_newline(path: str) -> bool:
    """Whether a secret file (not standard input) ends in a newline."""
    if path == "-":
        return False
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False  # a FIFO or /dev/fd/N: read once already, opening it again waits
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError:
        return False


def read_new_secret(passphrase_file: str | None, key_file: str | None = None, *,
                    offset: int = 0, size: int | None = None,
                    prompt: str = "Enter new passphrase: ") -> bytearray:
    """A new secret: a key file's bytes, a passphrase file's first line, or
    typed on the terminal twice (as cryptsetup asks for a new one)."""
    if key_file:
        return read_secret(key_file, offset=offset, size=size)
    path = passphrase_file or "-"
    if path != "-" or not sys.stdin.isatty():
        return read_secret(path, first_line=True)
    first = read_secret("-", first_line=True, prompt=prompt)
    again = read_secret("-", first_line=True, prompt="Verify passphrase: ")
    try:
        if first != again:
            wipe_buffer(first)
            raise SecretError("the passphrases typed do not match")
    finally:
        wipe_buffer(again)
    return first


def wipe_buffer(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def _prompt(limit: int, text: str) -> bytearray:
    """A passphrase typed on the terminal, not echoed (as cryptsetup asks)."""
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    quiet = list(old)
    quiet[3] &= ~termios.ECHO
    buf = bytearray()
    try:
        # Echo off first, then the prompt: what is typed after it is never shown.
        termios.tcsetattr(fd, termios.TCSAFLUSH, quiet)
        os.write(2, text.encode())
        while len(buf) <= limit:
            c = os.read(fd, 1)
            if not c or c == b"\n":
                break
            buf += c
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, old)
        os.write(2, b"\n")
    return buf


def _read(path: str, offset: int, limit: int, prompt: str) -> bytearray:
    """Up to limit + 1 bytes after `offset` (one more tells "too long")."""
    if path == "-" and offset == 0 and sys.stdin.isatty():
        return _prompt(limit, prompt)
    try:
        fd = sys.stdin.buffer.fileno() if path == "-" else os.open(path,
                                                                  os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SecretError(f"cannot open secret file {path}: {e.strerror}") from None
    buf = bytearray()
    try:
        skip = offset
        while skip > 0:  # pipes cannot seek
            chunk = os.read(fd, min(skip, 65536))
            if not chunk:
                raise SecretError(f"secret file {path} is shorter than the key file offset")
            skip -= len(chunk)
        while len(buf) < limit + 1:
            chunk = os.read(fd, min(65536, limit + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
    except OSError as e:
        raise SecretError(f"cannot read secret file {path}: {e.strerror}") from None
    finally:
        if path != "-":
            os.close(fd)
    return buf
