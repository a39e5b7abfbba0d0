"""Typed LUKS errors. Messages are one line, name the reason, and never
carry key material."""


class LuksError(Exception):
    """Base: the volume cannot be used as given."""


class NotLuksError(LuksError):
    """No LUKS header where one was expected."""


class HeaderError(LuksError):
    """A header that is damaged, truncated or inconsistent."""


class UnsupportedError(LuksError):
    """A valid volume that uses something we do not (yet) implement or refuse."""


class WrongKeyError(LuksError):
    """No key slot opens with the key given, or the volume key is wrong."""
