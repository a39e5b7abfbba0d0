from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdluks import native
from nbdluks.luks import evp
from nbdluks.luks.cipher import CipherSpec, SectorCipher
from nbdluks.luks.ecb import Ecb
from nbdluks.luks.engines import EVP_MAX_UNITS
from nbdluks.luks.errors import UnsupportedError
from nbdluks.luks.ivgen import IvGen
from nbdluks.luks.xts import DOUBLING_MIN, NumpyXts, Scratch
from tests.luks import reference

# IEEE 1619-2007 XTS-AES test vectors (key1 = data key, key2 = tweak key).
IEEE_1619 = [
    ("00" * 16, "00" * 16, 0, "00" * 32,
     "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"),
    ("11" * 16, "22" * 16, 0x3333333333, "44" * 32,
     "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"),
    ("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0", "22" * 16, 0x3333333333, "44" * 32,
     "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89"),
]


@pytest.mark.parametrize(("k1", "k2", "dusn", "pt", "ct"), IEEE_1619)
def test_ieee_1619_vectors(k1: str, k2: str, dusn: int, pt: str, ct: str) -> None:
    key = bytes.fromhex(k1 + k2)
    sc = SectorCipher(CipherSpec.parse("aes-xts-plain64"), key, sector_size=32, iv_step=1)
    buf = bytearray.fromhex(pt)
    sc.encrypt(buf, dusn)
    assert buf.hex() == ct
    sc.decrypt(buf, dusn)
    assert buf.hex() == pt


def test_ieee_1619_vector_4_512_byte_unit() -> None:
    key = bytes.fromhex("27182818284590452353602874713526" "31415926535897932384626433832795")
    pt = bytes(range(256)) * 2
    sc = SectorCipher(CipherSpec.parse("aes-xts-plain64"), key, sector_size=512)
    buf = bytearray(pt)
    sc.encrypt(buf, 0)
    assert buf[:32].hex() == (
        "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c"
    )
    assert bytes(buf) == reference.crypt(pt, "aes-xts-plain64", key)


SPECS = [
    ("aes-xts-plain64", 64), ("aes-xts-plain64", 32), ("aes-xts-plain", 64),
    ("aes-xts-plain64be", 64), ("aes-xts-essiv:sha256", 64),
    ("aes-cbc-essiv:sha256", 32), ("aes-cbc-essiv:sha256", 16), ("aes-cbc-plain64", 24),
    ("aes-cbc-plain", 32), ("aes-cbc-plain64be", 32), ("aes-cbc-benbi", 32),
    ("aes-cbc-null", 32), ("aes-ecb", 32), ("aes-ctr-plain64", 32), ("aes-ctr-plain", 16),
    ("camellia-xts-plain64", 64), ("camellia-cbc-essiv:sha256", 32), ("sm4-xts-plain64", 32),
    ("sm4-cbc-plain64", 16),
]


@pytest.mark.parametrize(("spec", "key_bytes"), SPECS)
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_bulk_matches_per_sector_reference(spec: str, key_bytes: int, sector_size: int) -> None:
    key = os.urandom(key_bytes)
    data = os.urandom(sector_size * 9)
    first = 123456789 * 8  # a large sector number (sector-size aligned)
    sc = SectorCipher(CipherSpec.parse(spec), key, sector_size)
    buf = bytearray(data)
    sc.encrypt(buf, first)
    assert bytes(buf) == reference.crypt(data, spec, key, sector_size, iv_offset=first)
    sc.decrypt(buf, first)
    assert bytes(buf) == data


def test_plain_iv_wraps_at_32_bits() -> None:
    key = os.urandom(64)
    data = os.urandom(1024)
    sc = SectorCipher(CipherSpec.parse("aes-xts-plain"), key)
    buf = bytearray(data)
    sc.encrypt(buf, 2**32 - 1)
    assert bytes(buf) == reference.crypt(data, "aes-xts-plain", key, iv_offset=2**32 - 1)


@pytest.mark.parametrize("sector_size", [32, 512, 1024, 4096])
@pytest.mark.parametrize("count", [5, DOUBLING_MIN + 3])  # both ways of building the table
def test_xts_tweak_table_equals_textbook_doubling(sector_size: int, count: int) -> None:
    key = os.urandom(64)
    step = sector_size // 512
    sc = NumpyXts(Ecb("aes", key[:32]), Ecb("aes", key[32:]), IvGen("plain64", step), sector_size)
    tw = sc.tweaks(1000, count, Scratch())
    ecb = Cipher(algorithms.AES(key[32:]), modes.ECB()).encryptor()
    for j in range(count):
        iv = (1000 + j * step).to_bytes(16, "little")
        t = int.from_bytes(ecb.update(iv), "little")
        for i in range(sector_size // 16):
            got = int(tw[j, i, 0]) | (int(tw[j, i, 1]) << 64)
            assert got == t, (j, i)
            t = ((t << 1) ^ (0x87 if t >> 127 else 0)) & ((1 << 128) - 1)


@pytest.mark.parametrize("name", ["serpent-xts-plain64", "twofish-cbc-essiv:sha256"])
def test_serpent_and_twofish_are_refused_by_name(name: str) -> None:
    with pytest.raises(UnsupportedError, match=name.split("-")[0]):
        CipherSpec.parse(name)


@pytest.mark.parametrize("name", ["aes-lrw-benbi", "aes-xts-lmk", "capi:xts(aes)-plain64",
                                  "aes", "aes-cbc-essiv:nohash"])
def test_unsupported_specs(name: str) -> None:
    with pytest.raises(UnsupportedError):
        CipherSpec.parse(name)


def test_luks1_style_two_part_names_and_key_sizes() -> None:
    spec = CipherSpec.parse("aes", "cbc-essiv:sha256")
    assert str(spec) == "aes-cbc-essiv:sha256"
    with pytest.raises(UnsupportedError, match="not valid"):
        SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(20))
    with pytest.raises(UnsupportedError, match="not valid"):
        SectorCipher(CipherSpec.parse("sm4-cbc-plain64"), bytes(32))


def test_partial_units_are_rejected() -> None:
    sc = SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(64), 4096)
    with pytest.raises(ValueError):
        sc.decrypt(bytearray(512), 0)


@pytest.mark.parametrize(("sector_size", "counts"),
                         [(512, (1, 2, EVP_MAX_UNITS[512], EVP_MAX_UNITS[512] + 1)),
                          (1024, (EVP_MAX_UNITS[1024], EVP_MAX_UNITS[1024] + 1)),
                          (2048, (1, 100)), (4096, (1, 3, 200))])
@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("loop", ["c", "ctypes"])
def test_evp_path_agrees_with_numpy_path(sector_size: int, counts: tuple[int, ...],
                                         key_bytes: int, loop: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if loop == "ctypes":  # as without the C helper
        monkeypatch.setattr(evp, "_xtsloop", None)
    elif not evp._xtsloop:
        pytest.skip("the C helper is not built")
    key = os.urandom(key_bytes)
    fast = SectorCipher(CipherSpec.parse("aes-xts-plain64"), key, sector_size)
    bulk = SectorCipher(CipherSpec.parse("aes-xts-plain64"), key, sector_size, engine="numpy")
    assert fast.engine != "numpy", "libcrypto's EVP should load on Debian"
    for n in counts:
        data = os.urandom(sector_size * n)
        a, b = bytearray(data), bytearray(data)
        fast.encrypt(a, 8 * n + 3)
        bulk.encrypt(b, 8 * n + 3)
        assert a == b == reference.crypt(data, "aes-xts-plain64", key, sector_size, 8 * n + 3)
        fast.decrypt(a, 8 * n + 3)
        assert a == data


def test_evp_is_not_used_where_openssl_cannot() -> None:
    assert evp.load(os.urandom(48)) is None  # AES-192-XTS: OpenSSL has none
    assert evp.load(bytes(32) * 2) is None  # equal halves: OpenSSL refuses them
    sc = SectorCipher(CipherSpec.parse("aes-xts-plain64"), bytes(32) * 2, 4096)
    buf = bytearray(8192)
    sc.encrypt(buf, 0)  # the numpy pipeline takes over
    assert buf == reference.crypt(bytes(8192), "aes-xts-plain64", bytes(64), 4096, 0)


def test_evp_checks_buffers_before_using_pointers() -> None:
    x = evp.load(os.urandom(64))
    assert x is not None
    ivs = np.zeros((2, 2), dtype=np.uint64)
    with pytest.raises(TypeError):
        x.crypt(memoryview(bytes(1024)), 512, ivs, encrypt=True)  # read-only
    with pytest.raises(ValueError):
        x.crypt(bytearray(1024), 512, ivs[:1], encrypt=True)  # an IV short
    with pytest.raises(ValueError):
        x.crypt(bytearray(1000), 500, ivs, encrypt=True)  # not whole blocks
    x.crypt(bytearray(1024), 512, ivs, encrypt=True)
    x.close()
    with pytest.raises(ValueError):
        x.crypt(bytearray(1024), 512, ivs, encrypt=True)  # its contexts are freed


@pytest.mark.skipif(not evp._xtsloop, reason="the C helper is not built")
@pytest.mark.parametrize("spec", ["aes-xts-plain64", "aes-xts-plain", "aes-xts-plain64be",
                                  "aes-xts-essiv:sha256"])
@pytest.mark.parametrize("sector_size", [512, 4096])
def test_c_helper_agrees_with_the_other_engines(spec: str, sector_size: int) -> None:
    key = os.urandom(64)
    c = SectorCipher(CipherSpec.parse(spec), key, sector_size)
    assert c.engine == "openssl-evp+c"
    numpy_ = SectorCipher(CipherSpec.parse(spec), key, sector_size, engine="numpy")
    for n, first in ((1, 0), (7, 2**32 - 3), (300, 12345)):
        data = os.urandom(sector_size * n)
        a, b = bytearray(data), bytearray(data)
        c.encrypt(a, first)
        numpy_.encrypt(b, first)
        assert a == b == reference.crypt(data, spec, key, sector_size, first)
        c.decrypt(a, first)
        assert a == data


@pytest.mark.skipif(not evp._xtsloop, reason="the C helper is not built")
def test_c_helper_checks_its_arguments() -> None:
    x = evp.load(os.urandom(64))
    assert x is not None
    with pytest.raises(TypeError):
        x.crypt_c(memoryview(bytes(1024)), 512, 0, 1, "plain64", None, True)  # read-only
    with pytest.raises(ValueError):
        x.crypt_c(bytearray(1000), 500, 0, 1, "plain64", None, True)  # not 16-byte units
    with pytest.raises(ValueError):
        x.crypt_c(bytearray(1024), 512, 0, 1, "essiv", None, True)  # IVs needed
    with pytest.raises(ValueError):
        x.crypt_c(bytearray(1024), 512, 0, 1, "essiv", np.zeros((1, 2), np.uint64), True)
    x.close()
    with pytest.raises(ValueError):
        x.crypt_c(bytearray(1024), 512, 0, 1, "plain64", None, True)  # contexts freed


def test_the_c_helper_is_built_where_ci_runs() -> None:
    """CI installs a compiler: there the C path must be the one tested
    (and the pure-Python one, in a second run with NBDLUKS_NATIVE=0)."""
    if os.environ.get("CI") and native.ENABLED and evp._xtsloop is None:
        pytest.fail("nbdluks/luks/_xtsloop.c was not built (setup.py build_ext)")
