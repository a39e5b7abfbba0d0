"""AES-XTS one data unit at a time through the system's libcrypto (ctypes).

`cryptography` wants a new cipher context for every tweak, which costs
more than the AES of a sector; OpenSSL's EVP interface lets one context take
a new tweak per unit. It has no fixed cost per request, unlike the numpy
pipeline (xts.py), but a cost per unit.

The loop over units runs in the C helper (_xtsloop.c) when it is built: one
call per request, with the GIL released, and then EVP serves every AES-XTS
request. Without it the loop runs in Python through ctypes, two calls per
unit, and serves only the requests too short for numpy to catch up
(engines.py picks, once per SectorCipher).

This is an accelerator, never a requirement: without a usable libcrypto,
`load` returns None and the numpy pipeline does all the work. Functions are
called through `PyDLL`, which keeps the GIL: a call is shorter than
releasing and taking back the GIL would be.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from types import ModuleType
from typing import Any

import numpy as np

from .. import native

# Not built (no compiler) or turned off: the ctypes loop serves.
_xtsloop: ModuleType | None = native.load("nbdluks.luks._xtsloop")
# Whether this installation has the C helper (`nbdluks --version` says).
C_HELPER = _xtsloop is not None

_VP = ctypes.c_void_p
# IV generators the C helper makes itself (others come as an array of IVs).
C_IVGENS = {"plain64": 1, "plain": 2, "plain64be": 3}


class _Lib:
    # No argtypes: the hot loop passes reused c_void_p objects, which ctypes
    # takes as they are, where argtypes would convert every int on every
    # call. Every pointer argument is therefore wrapped in c_void_p by the
    # caller.
    def __init__(self, path: str) -> None:
        lib = ctypes.PyDLL(path)
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        if lib.OpenSSL_version_num() < 0x30000000:
            raise OSError(f"{path} is older than OpenSSL 3")
        self.ciphers = {32: lib.EVP_aes_128_xts, 64: lib.EVP_aes_256_xts}
        for f in self.ciphers.values():
            f.restype = _VP
        self.new = lib.EVP_CIPHER_CTX_new
        self.new.restype = _VP
        self.free = lib.EVP_CIPHER_CTX_free
        self.free.restype = None
        self.init = lib.EVP_CipherInit_ex
        self.init.restype = ctypes.c_int
        self.update = lib.EVP_CipherUpdate
        self.update.restype = ctypes.c_int
        # For the C helper: the functions' addresses.
        self.init_addr = ctypes.cast(self.init, _VP).value or 0
        self.update_addr = ctypes.cast(self.update, _VP).value or 0


_lib: _Lib | None = None
_lib_error: str | None = None
_lib_lock = threading.Lock()


def _library() -> _Lib | None:
    global _lib, _lib_error
    with _lib_lock:
        if _lib is None and _lib_error is None:
            for path in (ctypes.util.find_library("crypto"), "libcrypto.so.3"):
                if path is None:
                    continue
                try:
                    _lib = _Lib(path)
                    break
                except (OSError, AttributeError) as e:
                    _lib_error = str(e)
            else:
                _lib_error = _lib_error or "libcrypto not found"
        return _lib


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _mlock(buf: bytearray) -> bool:
    address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    return bool(_libc.mlock(address, len(buf)) == 0)


class EvpXts:
    """AES-XTS with a caller-given 16-byte tweak IV per unit."""

    def __init__(self, lib: _Lib, key: bytes | bytearray) -> None:
        self._lib = lib
        self._cipher = lib.ciphers[len(key)]()
        self._key = bytearray(key)
        # Every thread's key schedule is made from this copy: never swapped
        # out, where allowed (as unlock.lock_in_memory, which imports us).
        self.key_locked = _mlock(self._key)
        # The C loop, if built, fixed for the life of this context.
        self._c_loop = _xtsloop.crypt if _xtsloop is not None else None
        self._local = threading.local()
        self._contexts: list[_VP] = []
        self._lock = threading.Lock()
        self._closed = False

    def _context(self, encrypt: bool) -> _VP:
        name = "enc" if encrypt else "dec"
        ctx: _VP | None = getattr(self._local, name, None)
        if ctx is None:
            address = self._lib.new()
            if not address:
                raise MemoryError("EVP_CIPHER_CTX_new failed")
            ctx = _VP(address)
            with self._lock:
                self._contexts.append(ctx)
            # A pointer into the key's bytearray: no copy that could not be wiped.
            key = (ctypes.c_char * len(self._key)).from_buffer(self._key)
            try:
                ok = self._lib.init(ctx, _VP(self._cipher), None, key, None,
                                    ctypes.c_int(int(encrypt)))
            finally:
                del key
            if ok != 1:
                raise ValueError("OpenSSL refused the XTS key")
            setattr(self._local, name, ctx)
        return ctx

    def crypt(self, buf: bytearray | memoryview, unit: int, ivs: np.ndarray[Any, Any],
              encrypt: bool) -> None:
        """In place: unit j of `buf` (whole `unit`-byte units) with the
        16-byte tweak IV ivs[j] ((count, 2) uint64)."""
        # Raw pointers from here on: check what numpy would have checked.
        # from_buffer refuses read-only and non-contiguous buffers.
        p = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        count = len(memoryview(buf).cast("B")) // unit
        if (unit % 16 or count * unit != len(memoryview(buf).cast("B"))
                or ivs.shape != (count, 2) or ivs.dtype != np.uint64
                or not ivs.flags.c_contiguous):
            raise ValueError("one 16-byte IV per whole unit is needed")
        if self._closed:
            raise ValueError("this XTS context was closed")
        ctx = self._context(encrypt)
        iv = ivs.ctypes.data
        ivp, pp = _VP(), _VP()
        outl = ctypes.c_int()
        po = ctypes.byref(outl)
        keep, n = ctypes.c_int(-1), ctypes.c_int(unit)
        init, update = self._lib.init, self._lib.update
        for _ in range(count):
            ivp.value = iv
            pp.value = p
            if init(ctx, None, None, None, ivp, keep) != 1 or update(ctx, pp, po, pp, n) != 1:
                raise ValueError("OpenSSL XTS failed")
            iv += 16
            p += unit

    @property
    def in_c(self) -> bool:
        """Whether crypt_c is available (the C helper is built)."""
        return self._c_loop is not None

    def c_context(self, encrypt: bool) -> tuple[int, int, int]:
        """(EVP_CipherInit_ex, EVP_CipherUpdate, this thread's context), as
        addresses for C code: valid until close()."""
        if self._closed:
            raise ValueError("this XTS context was closed")
        ctx = self._context(encrypt).value
        assert ctx
        return self._lib.init_addr, self._lib.update_addr, ctx

    def crypt_c(self, buf: bytearray | memoryview, unit: int, first: int, step: int,
                ivgen: str, ivs: np.ndarray[Any, Any] | None, encrypt: bool) -> None:
        """In place, the loop in C: IVs made there for the plain generators
        (unit j: sector first + j*step), else taken from `ivs`."""
        mode = C_IVGENS.get(ivgen, 0)
        if mode == 0 and (ivs is None or ivs.dtype != np.uint64):
            raise ValueError("IVs are needed for this IV generator")
        self.crypt_c_mode(buf, unit, first, step, mode, ivs if mode == 0 else None, encrypt)

    def crypt_c_mode(self, buf: bytearray | memoryview, unit: int, first: int, step: int,
                     mode: int, ivs: np.ndarray[Any, Any] | None, encrypt: bool) -> None:
        """crypt_c with the IV generator given by its C_IVGENS code, 0 for
        uint64 IVs in `ivs` (the C helper checks their count)."""
        loop = self._c_loop
        if loop is None:
            raise ValueError("the C helper is not built")
        if self._closed:
            raise ValueError("this XTS context was closed")
        ctx = self._context(encrypt).value
        loop(self._lib.init_addr, self._lib.update_addr, ctx, buf, unit,
             first & 0xFFFFFFFFFFFFFFFF, step, mode, ivs)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            contexts, self._contexts = self._contexts, []
            self._key[:] = bytes(len(self._key))
        for ctx in contexts:
            self._lib.free(ctx)  # EVP_CIPHER_CTX_free cleanses the key schedule

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def load(key: bytes | bytearray) -> EvpXts | None:
    """An EVP AES-XTS for `key`, or None when libcrypto cannot do it (no
    library, AES-192, or a key OpenSSL refuses: equal halves)."""
    lib = _library()
    if lib is None or len(key) not in lib.ciphers:
        return None
    half = len(key) // 2
    if key[:half] == key[half:]:
        return None
    xts = EvpXts(lib, key)
    try:
        xts._context(False)
    except (ValueError, MemoryError):
        xts.close()
        return None
    return xts
