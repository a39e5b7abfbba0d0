"""Key derivation: PBKDF2 (any hashlib hash), Argon2i and Argon2id (version
0x13, the one cryptography implements and cryptsetup writes)."""

from __future__ import annotations

import hashlib
import threading

from cryptography.hazmat.primitives.kdf.argon2 import Argon2i, Argon2id

from .volume import Argon2, Kdf, Pbkdf2

# OpenSSL's PBKDF2 takes its iteration count as a C int (hashlib refuses
# more): a header asking for more is not computable here.
PBKDF2_MAX_ITERATIONS = 2**31 - 1


def derive(kdf: Kdf, secret: bytes | bytearray, length: int) -> bytearray:
    """The derived key. The KDF (C, the GIL released) runs on a thread of its
    own while the caller waits: in the main thread a signal's handler runs at
    once, so a stop never waits for a KDF that a hostile header made take
    hours, and the computing thread is a daemon that cannot hold the exit."""
    out: list[bytearray | BaseException] = []

    def compute() -> None:
        try:
            out.append(_derive(kdf, secret, length))
        except BaseException as e:  # handed to the caller
            out.append(e)

    worker = threading.Thread(target=compute, name="kdf", daemon=True)
    worker.start()
    worker.join()  # a signal interrupts this wait (its handler may raise)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _derive(kdf: Kdf, secret: bytes | bytearray, length: int) -> bytearray:
    if isinstance(kdf, Pbkdf2):
        return bytearray(
            hashlib.pbkdf2_hmac(kdf.hash, bytes(secret), kdf.salt, kdf.iterations, length)
        )
    assert isinstance(kdf, Argon2)
    cls = Argon2id if kdf.type == "argon2id" else Argon2i
    # cryptography needs memory >= 8 * lanes KiB; cryptsetup's minimum is 32.
    fn = cls(
        salt=kdf.salt, length=length, iterations=kdf.time, lanes=kdf.cpus,
        memory_cost=kdf.memory,
    )
    return bytearray(fn.derive(bytes(secret)))
