"""Hash names as LUKS headers spell them, resolved through hashlib.

cryptsetup (libgcrypt) opens volumes made with hashes that OpenSSL 3 keeps
in its "legacy" provider, such as whirlpool (a hash cryptsetup offers for
LUKS1). The first time a header names one that hashlib lacks, we load that
provider, next to the default one, into the default OpenSSL library context:
hashlib uses the same libcrypto, so hashlib.new and pbkdf2_hmac then have it.
Nothing is loaded for volumes that do not need it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import threading

_LEGACY = frozenset({"whirlpool", "ripemd160", "md4"})
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def _load_legacy() -> bool:
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = False
            for path in (ctypes.util.find_library("crypto"), "libcrypto.so.3"):
                if path is None:
                    continue
                try:
                    lib = ctypes.CDLL(path)
                    load = lib.OSSL_PROVIDER_load
                except (OSError, AttributeError):
                    continue
                load.restype = ctypes.c_void_p
                load.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
                # Loading one provider by hand stops the default one from
                # loading by itself: load both.
                _loaded = bool(load(None, b"default")) and bool(load(None, b"legacy"))
                break
        return _loaded


def digest_size(name: str) -> int | None:
    """The digest size of hash `name`, None when it is not available here."""
    try:
        return hashlib.new(name).digest_size
    except ValueError:
        pass
    if name.lower() not in _LEGACY or not _load_legacy():
        return None
    try:
        return hashlib.new(name).digest_size
    except ValueError:
        return None
