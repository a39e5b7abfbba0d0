"""Unlocking a volume: its sources opened (paths or NBD URIs), its header
copies read and compared, the secret read once (passphrase, key file,
volume key) or recovered through clevis tokens (Tang, sss), and the result:
an OpenVolume ready to serve."""

from .clevis.encrypt import EncryptError, UntrustedError
from .clevis.encrypt import encrypt as clevis_encrypt
from .clevis.pins import describe as describe_pins
from .headers import HeaderCopy, read_copies, read_copy, read_header
from .keys import NewlineKeyError, UnlockOptions, given_secret, key_check, secret_once
from .keys import unlock as unlock_copies
from .secrets import MAX_KEYFILE, KeyFileShortError, SecretError, read_new_secret, read_secret
from .sources import SourceError, open_source
from .tokens import UNLOCKING_TYPES, NoTokenError, TokenError, TokenOptions, unlock_with_tokens
from .tokens import candidates as token_candidates
from .tokens import recover as recover_passphrase
from .volume import (
    MemoryGate,
    Opener,
    OpenVolume,
    RotateSettings,
    VolumeConfig,
    VolumeOptions,
    open_volume,
    open_volumes,
    reencryption_lock,
    release_lock,
)

__all__ = [
    "MAX_KEYFILE",
    "UNLOCKING_TYPES",
    "EncryptError",
    "HeaderCopy",
    "KeyFileShortError",
    "MemoryGate",
    "NewlineKeyError",
    "NoTokenError",
    "OpenVolume",
    "Opener",
    "RotateSettings",
    "SecretError",
    "SourceError",
    "TokenError",
    "TokenOptions",
    "UnlockOptions",
    "UntrustedError",
    "VolumeConfig",
    "VolumeOptions",
    "clevis_encrypt",
    "describe_pins",
    "given_secret",
    "key_check",
    "open_source",
    "open_volume",
    "open_volumes",
    "read_copies",
    "read_copy",
    "read_header",
    "read_new_secret",
    "read_secret",
    "recover_passphrase",
    "reencryption_lock",
    "release_lock",
    "secret_once",
    "token_candidates",
    "unlock_copies",
    "unlock_with_tokens",
]
