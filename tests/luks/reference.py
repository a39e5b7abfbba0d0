"""An independent, deliberately naive sector cipher for the tests: one
`cryptography` context per sector, IVs exactly as dm-crypt documents them.
It shares no code with nbdluks.luks.cipher, so agreement means something.

Also helpers to make volumes with `cryptsetup luksFormat` and read their
layout from `cryptsetup luksDump`.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.decrepit.ciphers.algorithms import Camellia
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

ALGS = {"aes": algorithms.AES, "camellia": Camellia, "sm4": algorithms.SM4}


def _iv(ivgen: str, sector: int, key: bytes, alg: str) -> bytes:
    name, _, h = ivgen.partition(":")
    if name == "plain":
        return struct.pack("<I", sector & 0xFFFFFFFF) + bytes(12)
    if name == "plain64":
        return struct.pack("<Q", sector) + bytes(8)
    if name == "plain64be":
        return bytes(8) + struct.pack(">Q", sector)
    if name == "benbi":
        return bytes(8) + struct.pack(">Q", (sector << 5) + 1)
    if name == "null":
        return bytes(16)
    if name == "essiv":
        # dm-crypt's essiv hashes the whole key, also for xts
        salt = hashlib.new(h, key).digest()
        enc = Cipher(ALGS[alg](salt), modes.ECB()).encryptor()
        return enc.update(struct.pack("<Q", sector) + bytes(8))
    raise ValueError(ivgen)


def _ctx(cipher: str, key: bytes, sector: int, encrypt: bool):  # type: ignore[no-untyped-def]
    parts = cipher.split("-", 2)
    alg, mode = parts[0], parts[1]
    ivgen = parts[2] if len(parts) > 2 else ""
    if mode == "ecb":
        c = Cipher(ALGS[alg](key), modes.ECB())
    else:
        iv = _iv(ivgen, sector, key, alg)
        m = {"xts": modes.XTS, "cbc": modes.CBC, "ctr": modes.CTR}[mode](iv)
        c = Cipher(ALGS[alg](key), m)
    return c.encryptor() if encrypt else c.decryptor()


def _xts_textbook(alg: str, key: bytes, iv: bytes, unit: bytes, encrypt: bool) -> bytes:
    """XTS block by block on Python integers (cryptography's XTS is AES-only)."""
    half = len(key) // 2
    data_c = Cipher(ALGS[alg](key[:half]), modes.ECB())
    t = int.from_bytes(Cipher(ALGS[alg](key[half:]), modes.ECB()).encryptor().update(iv),
                       "little")
    out = bytearray()
    for i in range(0, len(unit), 16):
        tb = t.to_bytes(16, "little")
        x = bytes(a ^ b for a, b in zip(unit[i : i + 16], tb, strict=True))
        ctx = data_c.encryptor() if encrypt else data_c.decryptor()
        y = ctx.update(x)
        out += bytes(a ^ b for a, b in zip(y, tb, strict=True))
        t = ((t << 1) ^ (0x87 if t >> 127 else 0)) & ((1 << 128) - 1)
    return bytes(out)


def crypt(data: bytes, cipher: str, key: bytes, sector_size: int = 512, iv_offset: int = 0,
          encrypt: bool = True) -> bytes:
    """Sector k uses IV sector iv_offset + k * sector_size / 512."""
    out = bytearray()
    alg, mode, *rest = cipher.split("-", 2)
    for k in range(len(data) // sector_size):
        sector = iv_offset + k * (sector_size // 512)
        unit = data[k * sector_size : (k + 1) * sector_size]
        # cryptography's XTS is AES-only and refuses keys with equal halves
        if mode == "xts" and (alg != "aes" or key[: len(key) // 2] == key[len(key) // 2 :]):
            out += _xts_textbook(alg, key, _iv(rest[0], sector, key, alg), unit, encrypt)
            continue
        out += _ctx(cipher, key, sector, encrypt).update(unit)
    return bytes(out)


@dataclass
class Made:
    payload: Path
    header: Path | None  # None: attached
    key: bytes
    passphrase: bytes
    offset: int  # bytes into the payload where data starts
    sector_size: int
    cipher: str

    @property
    def header_path(self) -> Path:
        return self.header or self.payload


def dump_offset(path: Path) -> tuple[int, int]:
    """(data offset in bytes, sector size) as cryptsetup luksDump reports them."""
    out = subprocess.run(["cryptsetup", "luksDump", str(path)], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"Payload offset:\s*(\d+)", out)
    if m:
        return int(m.group(1)) * 512, 512
    seg = out.split("Data segments:", 1)[1]
    offset = int(re.search(r"offset:\s*(\d+) \[bytes\]", seg).group(1))  # type: ignore[union-attr]
    sector = int(re.search(r"sector:\s*(\d+) \[bytes\]", seg).group(1))  # type: ignore[union-attr]
    return offset, sector


def add_key(target: Path, keyfile: Path, new_keyfile: Path) -> None:
    """cryptsetup luksAddKey with a fast PBKDF2 slot (LUKS1 or LUKS2)."""
    subprocess.run(["cryptsetup", "luksAddKey", "-q", "--pbkdf", "pbkdf2",
                    "--pbkdf-force-iterations", "1000", "--key-file", str(keyfile),
                    str(target), str(new_keyfile)], check=True, capture_output=True)


def luks_format(tmp: Path, *, version: int = 2, cipher: str = "aes-xts-plain64",
                key_bits: int = 512, sector_size: int | None = None, pbkdf: str = "pbkdf2",
                hash: str = "sha256", detached: bool = False, size: int = 8 << 20,
                passphrase: bytes = b"correct horse", extra: tuple[str, ...] = (),
                name: str = "vol") -> Made:
    import os

    payload = tmp / f"{name}.payload"
    header = tmp / f"{name}.header" if detached else None
    with open(payload, "wb") as f:
        f.truncate(size)
    if header:
        with open(header, "wb") as f:
            f.truncate(16 << 20)
    key = os.urandom(key_bits // 8)
    (tmp / f"{name}.vk").write_bytes(key)
    (tmp / f"{name}.pass").write_bytes(passphrase)
    cmd = ["cryptsetup", "luksFormat", "-q", "--type", f"luks{version}", "--cipher", cipher,
           "--key-size", str(key_bits), "--hash", hash,
           "--volume-key-file", str(tmp / f"{name}.vk"), "--key-file", str(tmp / f"{name}.pass")]
    if version == 2:
        cmd += ["--pbkdf", pbkdf]
        if pbkdf == "pbkdf2":
            cmd += ["--pbkdf-force-iterations", "1000"]
        else:
            cmd += ["--pbkdf-force-iterations", "4", "--pbkdf-memory", "32",
                    "--pbkdf-parallel", "1"]
    else:
        cmd += ["--pbkdf-force-iterations", "1000"]
    if sector_size:
        cmd += ["--sector-size", str(sector_size)]
    if header:
        cmd += ["--header", str(header)]
    cmd += [*extra, str(payload)]
    subprocess.run(cmd, check=True, capture_output=True)
    offset, ss = dump_offset(header or payload)
    return Made(payload, header, key, passphrase, offset, ss, cipher)


def fill(made: Made, plaintext: bytes) -> None:
    """Write `plaintext` encrypted (by this module) into the volume's data area."""
    ct = crypt(plaintext, made.cipher, made.key, made.sector_size)
    with open(made.payload, "r+b") as f:
        f.seek(made.offset)
        f.write(ct)


def read_plain(made: Made, length: int, at: int = 0) -> bytes:
    """Decrypt the data area independently."""
    with open(made.payload, "rb") as f:
        f.seek(made.offset + at)
        ct = f.read(length)
    return crypt(ct, made.cipher, made.key, made.sector_size,
                 iv_offset=at // 512, encrypt=False)


def qemu_luks_create(img: Path, secret: Path, size: int, opts: str) -> None:
    """`qemu-img create -f luks`, retried: qemu's PBKDF2 calibration fails now
    and then on fast CPUs ("Unable to get accurate CPU usage", a zero CPU-time
    delta), whatever iter-time says: on some machines more often than not, so
    the attempts are many (a failed one takes well under a second)."""
    cmd = ["qemu-img", "create", "-f", "luks", "--object", f"secret,id=s0,file={secret}",
           "-o", f"key-secret=s0,iter-time=10,{opts}", str(img), str(size)]
    attempts = 60
    for attempt in range(attempts):
        img.unlink(missing_ok=True)
        res = subprocess.run(cmd, capture_output=True)
        if res.returncode == 0:
            return
        if b"accurate CPU usage" not in res.stderr or attempt == attempts - 1:
            raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)
