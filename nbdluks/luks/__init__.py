"""The LUKS format: headers parsed and validated by cryptsetup's rules
(LUKS1, LUKS2), key slots unlocked, sector ciphers as dm-crypt defines them,
and LuksDevice, the plaintext view of a payload. Parsing and unlocking do
no I/O: the caller reads and passes bytes in."""

from . import hotzone, rotation
from .calibrate import (
    ARGON2_MAX_MEMORY,
    ARGON2_MAX_PARALLEL,
    ARGON2_MIN_MEMORY,
    ARGON2_MIN_TIME,
    PBKDF2_MIN_ITERATIONS,
    argon2_cost,
    pbkdf2_iterations,
)
from .cipher import CipherSpec, SectorCipher
from .create import FormatSpec, new_header
from .device import LuksDevice
from .edit import EditError, Header, Luks1Header, Luks2Header, Plan, header_of
from .edit import add_key as plan_add_key
from .edit import remove_binding as plan_remove_binding
from .edit import remove_key as plan_remove_key
from .edit import replace_key as plan_replace_key
from .encode import Step, Sync, Write
from .errors import Argon2MemoryError, HeaderError, LuksError, UnsupportedError, WrongKeyError
from .evp import C_HELPER
from .hashes import digest_size as hash_size
from .header import FIRST_PROBE, probe_size
from .header import parse as parse_header
from .kdf import PBKDF2_MAX_ITERATIONS
from .luks2 import DEFAULT_ARGON2_MAX_KIB
from .luks2 import HDR_SIZES as LUKS2_HDR_SIZES
from .reencrypt import RESILIENCES, Reencryption, logical_size
from .rotating import Boundary
from .rotation import RotationSpec
from .seal import SlotSpec, new_volume_key
from .segmented import open_device
from .unlock import (
    SlotsSkippedError,
    Unlocked,
    open_slot,
    reencryption_keys,
    unlock_with_passphrase,
    unlock_with_volume_key,
    wipe,
)
from .volume import HEADER_PROBE, Argon2, Keyslot, Pbkdf2, Token, Volume

__all__ = [
    "ARGON2_MAX_MEMORY",
    "ARGON2_MAX_PARALLEL",
    "ARGON2_MIN_MEMORY",
    "ARGON2_MIN_TIME",
    "C_HELPER",
    "DEFAULT_ARGON2_MAX_KIB",
    "FIRST_PROBE",
    "HEADER_PROBE",
    "LUKS2_HDR_SIZES",
    "PBKDF2_MAX_ITERATIONS",
    "PBKDF2_MIN_ITERATIONS",
    "RESILIENCES",
    "Argon2",
    "Argon2MemoryError",
    "Boundary",
    "CipherSpec",
    "EditError",
    "FormatSpec",
    "Header",
    "HeaderError",
    "Keyslot",
    "Luks1Header",
    "Luks2Header",
    "LuksDevice",
    "LuksError",
    "Pbkdf2",
    "Plan",
    "Reencryption",
    "RotationSpec",
    "SectorCipher",
    "SlotSpec",
    "SlotsSkippedError",
    "Step",
    "Sync",
    "Token",
    "Unlocked",
    "UnsupportedError",
    "Volume",
    "Write",
    "WrongKeyError",
    "argon2_cost",
    "hash_size",
    "header_of",
    "hotzone",
    "logical_size",
    "new_header",
    "new_volume_key",
    "open_device",
    "open_slot",
    "parse_header",
    "pbkdf2_iterations",
    "plan_add_key",
    "plan_remove_binding",
    "plan_remove_key",
    "plan_replace_key",
    "probe_size",
    "reencryption_keys",
    "rotation",
    "unlock_with_passphrase",
    "unlock_with_volume_key",
    "wipe",
]
