"""Volumes made by `cryptsetup luksFormat` (and qemu), opened and decrypted
by nbdluks, compared byte for byte with a known plaintext."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nbdluks.luks.errors import WrongKeyError
from nbdluks.unlock.keys import UnlockOptions
from tests.conftest import need, pattern
from tests.luks.opening import open_luks
from tests.luks.reference import Made, fill, luks_format, qemu_luks_create

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("cryptsetup")


def read_all(made: Made, keys: UnlockOptions, detached: bool | None = None
             ) -> tuple[bytes, int | None]:
    dev, _vol, slot = open_luks(
        str(made.payload), str(made.header) if made.header else None, keys, read_only=True
    )
    with dev:
        buf = bytearray(dev.size)
        dev.pread_into(memoryview(buf), 0)
        # an unaligned read in the middle decrypts the same bytes
        odd = bytearray(1000)
        dev.pread_into(memoryview(odd), 777)
        assert odd == buf[777:1777]
    return bytes(buf), slot


def check_roundtrip(tmp_path: Path, made: Made) -> None:
    size = (made.payload.stat().st_size - made.offset) // made.sector_size * made.sector_size
    plain = pattern(size, seed=size)
    fill(made, plain)
    pw = tmp_path / "pw.txt"
    pw.write_bytes(made.passphrase + b"\n")
    got, slot = read_all(made, UnlockOptions(passphrase_file=str(pw)))
    assert got == plain
    assert slot == 0
    vk = tmp_path / "vk.bin"
    vk.write_bytes(made.key)
    got, slot = read_all(made, UnlockOptions(volume_key_file=str(vk)))
    assert got == plain and slot is None


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512", "whirlpool", "ripemd160"])
def test_luks1_hashes(tmp_path: Path, hash_name: str) -> None:
    check_roundtrip(tmp_path, luks_format(tmp_path, version=1, hash=hash_name, size=4 * MiB))


@pytest.mark.parametrize(
    ("cipher", "bits"),
    [
        ("aes-xts-plain64", 256), ("aes-xts-plain", 512), ("aes-xts-plain64be", 512),
        ("aes-cbc-essiv:sha256", 256), ("aes-cbc-essiv:sha256", 128), ("aes-cbc-plain64", 192),
        ("aes-cbc-plain", 256), ("aes-cbc-benbi", 256), ("aes-cbc-null", 256), ("aes-ecb", 256),
        ("aes-ctr-plain64", 256), ("camellia-cbc-essiv:sha256", 256),
    ],
)
def test_luks1_ciphers(tmp_path: Path, cipher: str, bits: int) -> None:
    check_roundtrip(
        tmp_path, luks_format(tmp_path, version=1, cipher=cipher, key_bits=bits, size=3 * MiB)
    )


@pytest.mark.parametrize("pbkdf", ["pbkdf2", "argon2i", "argon2id"])
@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096])
@pytest.mark.parametrize("detached", [False, True], ids=["attached", "detached"])
def test_luks2_matrix(tmp_path: Path, pbkdf: str, sector_size: int, detached: bool) -> None:
    made = luks_format(tmp_path, pbkdf=pbkdf, sector_size=sector_size, detached=detached,
                       size=(2 if detached else 18) * MiB)
    if detached:
        assert made.offset == 0
    check_roundtrip(tmp_path, made)


def test_luks2_cbc_essiv_and_xts_128(tmp_path: Path) -> None:
    check_roundtrip(tmp_path, luks_format(tmp_path, cipher="aes-cbc-essiv:sha256",
                                          key_bits=256, size=18 * MiB, name="a"))
    check_roundtrip(tmp_path, luks_format(tmp_path, key_bits=256, size=18 * MiB, name="b"))


def cs(*args: str, input: bytes | None = None) -> None:
    subprocess.run(["cryptsetup", "-q", *args], check=True, capture_output=True, input=input)


def test_key_slots_priorities_and_wrong_passphrase(tmp_path: Path) -> None:
    made = luks_format(tmp_path, detached=True, size=MiB, passphrase=b"alpha")
    hdr = str(made.header)
    fast = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    (tmp_path / "a").write_bytes(b"alpha")
    (tmp_path / "b").write_bytes(b"bravo")
    (tmp_path / "c").write_bytes(b"charlie")
    # slot 1 opens with the same passphrase as slot 0, slot 2 with another
    cs("luksAddKey", *fast, "--key-file", str(tmp_path / "a"), "--new-keyfile",
       str(tmp_path / "a"), "--new-key-slot", "1", hdr)
    cs("luksAddKey", *fast, "--key-file", str(tmp_path / "a"), "--new-keyfile",
       str(tmp_path / "c"), "--new-key-slot", "2", hdr)
    cs("luksAddKey", *fast, "--key-file", str(tmp_path / "a"), "--new-keyfile",
       str(tmp_path / "b"), "--new-key-slot", "5", hdr)
    cs("config", "--priority", "prefer", "--key-slot", "1", hdr)
    cs("config", "--priority", "ignore", "--key-slot", "2", hdr)
    plain = pattern(MiB, seed=9)
    fill(made, plain)

    def slot_for(secret: str, only: int | None = None) -> int | None:
        return read_all(made, UnlockOptions(key_file=str(tmp_path / secret), key_slot=only))[1]

    assert slot_for("a") == 1  # high priority tried first
    assert slot_for("a", only=0) == 0
    assert slot_for("b") == 5
    with pytest.raises(WrongKeyError, match="no key slot matches"):
        slot_for("c")  # slot 2 is "ignore": only when named
    assert slot_for("c", only=2) == 2
    with pytest.raises(WrongKeyError, match="key slot 0 does not open"):
        slot_for("b", only=0)
    with pytest.raises(WrongKeyError, match="not active"):
        slot_for("b", only=7)
    vk = tmp_path / "bad.vk"
    vk.write_bytes(bytes(64))
    with pytest.raises(WrongKeyError, match="does not match"):
        read_all(made, UnlockOptions(volume_key_file=str(vk)))


@pytest.mark.parametrize("version", [1, 2])
def test_key_file_with_offset_and_size(tmp_path: Path, version: int) -> None:
    blob = pattern(4096, seed=42)
    made = luks_format(tmp_path, version=version, detached=True, size=MiB, passphrase=blob,
                       extra=("--keyfile-offset", "1000", "--keyfile-size", "333"))
    kf = str(tmp_path / "vol.pass")
    plain = pattern(MiB, seed=4)
    fill(made, plain)
    got, slot = read_all(made, UnlockOptions(key_file=kf, keyfile_offset=1000, keyfile_size=333))
    assert (got, slot) == (plain, 0)
    for off, size in ((1001, 333), (1000, 332), (0, None)):
        with pytest.raises(WrongKeyError):
            read_all(made, UnlockOptions(key_file=kf, keyfile_offset=off, keyfile_size=size))


def test_luks1_written_by_qemu(tmp_path: Path) -> None:
    need("qemu-img")
    secret = tmp_path / "pw"
    secret.write_bytes(b"qemu secret")
    img = tmp_path / "q.luks"
    plain_path = tmp_path / "plain.raw"
    plain = pattern(6 * MiB, seed=11)
    plain_path.write_bytes(plain)
    obj = f"secret,id=s0,file={secret}"
    for opts in ("cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256",
                 "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,"
                 "hash-alg=sha1"):
        qemu_luks_create(img, secret, 6 * MiB, opts)
        subprocess.run(["qemu-img", "convert", "-n", "--object", obj, "-f", "raw",
                        str(plain_path), "--target-image-opts",
                        f"driver=luks,file.filename={img},key-secret=s0"],
                       check=True, capture_output=True)
        dev, vol, _ = open_luks(str(img), None, UnlockOptions(key_file=str(secret)), read_only=True)
        with dev:
            assert vol.version == 1
            buf = bytearray(dev.size)
            dev.pread_into(memoryview(buf), 0)
        assert bytes(buf) == plain
