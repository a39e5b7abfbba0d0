"""A volume's life on any source it can be served from: format, key slots
(add, change, remove, kill), clevis bindings, header backups, the volume
key's rotation (reencryption); written as
cryptsetup writes them, in an order a crash cannot break."""

from .backup import header_backup, header_restore
from .binding import PINS, Bound, bind, unbind
from .format import Formatted, format_volume
from .kdf import KDF_TYPES, KdfOptions
from .keys import NewKey, add_key, change_key, kill_slot, remove_key
from .online import open_rotating, rotate_beside
from .reencrypt import (
           ONLINE_HOTZONE,
           ONLINE_RATE,
           Progress,
           ReencryptOptions,
           reencrypt,
           run_beside,
)
from .store import ConcurrentChangeError, ManageError
from .target import Target

__all__ = [
           "KDF_TYPES",
           "ONLINE_HOTZONE",
           "ONLINE_RATE",
           "PINS",
           "Bound",
           "ConcurrentChangeError",
           "Formatted",
           "KdfOptions",
           "ManageError",
           "NewKey",
           "Progress",
           "ReencryptOptions",
           "Target",
           "add_key",
           "bind",
           "change_key",
           "format_volume",
           "header_backup",
           "header_restore",
           "kill_slot",
           "open_rotating",
           "reencrypt",
           "remove_key",
           "rotate_beside",
           "run_beside",
           "unbind",
]
