"""Typed LUKS errors. Messages are one line, name the reason, and never
carry key material."""

from ..errors import NbdluksError


class LuksError(NbdluksError):
    """Base: the volume cannot be used as given."""


class NotLuksError(LuksError):
    """No LUKS header where one was expected."""


class HeaderError(LuksError):
    """A header that is damaged, truncated or inconsistent."""


class UnsupportedError(LuksError):
    """A valid volume that uses something we do not (yet) implement or refuse."""


class Argon2MemoryError(UnsupportedError):
    """A key slot's Argon2 cost is above the memory cap we were given."""

    def __init__(self, where: str, memory_kib: int, cap_kib: int) -> None:
        super().__init__(f"{where} asks for {memory_kib} KiB of Argon2 memory, above the cap "
                         f"of {cap_kib} KiB")
        self.where = where
        self.memory_kib = memory_kib
        self.cap_kib = cap_kib


class WrongKeyError(LuksError):
    """No key slot opens with the key given, or the volume key is wrong."""
