"""The LUKS format: headers parsed and validated by cryptsetup's rules
(LUKS1, LUKS2), key slots unlocked, sector ciphers as dm-crypt defines them,
and LuksDevice, the plaintext view of a payload. Parsing and unlocking do
no I/O: the caller reads and passes bytes in."""

from .device import LuksDevice
from .errors import Argon2MemoryError, HeaderError, LuksError, UnsupportedError, WrongKeyError
from .evp import C_HELPER
from .header import FIRST_PROBE, probe_size
from .header import parse as parse_header
from .luks2 import DEFAULT_ARGON2_MAX_KIB
from .unlock import (
    SlotsSkippedError,
    Unlocked,
    unlock_with_passphrase,
    unlock_with_volume_key,
    wipe,
)
from .volume import HEADER_PROBE, Argon2, Keyslot, Pbkdf2, Token, Volume

__all__ = [
    "C_HELPER", "DEFAULT_ARGON2_MAX_KIB", "FIRST_PROBE", "HEADER_PROBE", "Argon2",
    "Argon2MemoryError", "HeaderError", "Keyslot", "LuksDevice", "LuksError", "Pbkdf2",
    "SlotsSkippedError", "Token", "Unlocked", "UnsupportedError", "Volume", "WrongKeyError",
    "parse_header", "probe_size", "unlock_with_passphrase", "unlock_with_volume_key", "wipe",
]
