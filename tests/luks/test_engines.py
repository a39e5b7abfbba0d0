"""The XTS engines and the choice among them (nbdluks.luks.engines): made
once per SectorCipher, and every engine computes the same bytes."""

from __future__ import annotations

import itertools
import os
import re

import pytest

from nbdluks.luks import engines, evp
from nbdluks.luks.cipher import IVGENS, MODES, CipherSpec, SectorCipher
from nbdluks.luks.engines import ALWAYS, ENGINES, EVP_MAX_UNITS, evp_max_units
from nbdluks.luks.xts import DOUBLING_MIN, NumpyXts
from tests.luks import reference

C_BUILT = evp._xtsloop is not None
EVP_LOADS = evp.load(os.urandom(64)) is not None


def available(engine: str) -> bool:
    return engine == "numpy" or (EVP_LOADS and (engine != "openssl-evp+c" or C_BUILT))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096])
@pytest.mark.parametrize("iv", ["plain64", "plain", "plain64be", "essiv:sha256"])
def test_every_engine_gives_the_same_bytes(engine: str, sector_size: int, iv: str) -> None:
    if not available(engine):
        pytest.skip(f"{engine} is not available here")
    spec = f"aes-xts-{iv}"
    key = os.urandom(64)
    sc = SectorCipher(CipherSpec.parse(spec), key, sector_size, engine=engine)
    assert sc.engine == engine
    edge = min(evp_max_units(sector_size), 100)
    for n in sorted({1, 2, edge, edge + 1, DOUBLING_MIN + 1}):
        first = 2**32 - 5 + n  # across the 32-bit wrap of "plain"
        data = os.urandom(sector_size * n)
        buf = bytearray(data)
        sc.encrypt(buf, first)
        assert buf == reference.crypt(data, spec, key, sector_size, first), n
        sc.decrypt(memoryview(buf), first)
        assert buf == data, n


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_takes_empty_and_refuses_partial_units(engine: str) -> None:
    if not available(engine):
        pytest.skip(f"{engine} is not available here")
    sc = SectorCipher(CipherSpec.parse("aes-xts-plain64"), os.urandom(64), 4096, engine=engine)
    sc.encrypt(bytearray(), 0)
    sc.decrypt(bytearray(), 0)
    for bad in (bytearray(512), bytearray(4096 + 16)):
        with pytest.raises(ValueError, match="whole 4096-byte units"):
            sc.encrypt(bad, 0)
        with pytest.raises(ValueError, match="whole 4096-byte units"):
            sc.decrypt(bad, 0)


def test_the_engine_is_fixed_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    key = os.urandom(64)
    sc = SectorCipher(CipherSpec.parse("aes-xts-plain64"), key, 512)
    engine = sc.engine
    # What the choice depended on changes afterwards: nothing moves.
    monkeypatch.setattr(evp, "_xtsloop", None)
    monkeypatch.setattr(engines, "EVP_MAX_UNITS", {512: 0})
    monkeypatch.setattr(sc, "spec", CipherSpec.parse("aes-cbc-plain64"))
    assert sc.engine == engine
    assert getattr(sc.encrypt, "__self__", None) is getattr(sc.decrypt, "__self__", None)
    assert sc.encrypt.__self__.engine == engine  # type: ignore[attr-defined]
    data = os.urandom(512 * 40)
    buf = bytearray(data)
    sc.encrypt(buf, 7)
    assert buf == reference.crypt(data, "aes-xts-plain64", key, 512, 7)


@pytest.mark.parametrize("sector_size", [32, 512, 1024, 2048, 4096])
def test_default_engine_follows_the_crossover_table(sector_size: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spec = CipherSpec.parse("aes-xts-plain64")
    if C_BUILT:  # the C loop serves every AES-XTS request
        assert SectorCipher(spec, os.urandom(64), sector_size).engine == "openssl-evp+c"
    monkeypatch.setattr(evp, "_xtsloop", None)
    engine = SectorCipher(spec, os.urandom(64), sector_size).engine
    if not EVP_LOADS or sector_size not in EVP_MAX_UNITS:
        assert engine == "numpy"
    elif EVP_MAX_UNITS[sector_size] == ALWAYS:
        assert engine == "openssl-evp"
    else:
        assert engine == "numpy+openssl-evp"


@pytest.mark.skipif(not EVP_LOADS, reason="no usable libcrypto")
def test_the_hybrid_engine_switches_at_the_table_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = CipherSpec.parse("aes-xts-plain64")
    sc = SectorCipher(spec, os.urandom(64), 512, engine="numpy+openssl-evp")
    used: list[str] = []
    for cls in (engines.CtypesXts, NumpyXts):
        monkeypatch.setattr(cls, "decrypt", lambda self, buf, iv: used.append(self.engine))
    edge = EVP_MAX_UNITS[512]
    for n in (1, edge, edge + 1):
        sc.decrypt(bytearray(512 * n), 0)
    assert used == ["openssl-evp", "openssl-evp", "numpy"]


def test_the_crossover_table_and_its_fallback() -> None:
    assert evp_max_units(32) == 0  # not a LUKS sector size: numpy
    for size, units in EVP_MAX_UNITS.items():
        assert evp_max_units(size) == units
        assert units == ALWAYS or 0 < units < ALWAYS
    assert evp_max_units(8192) == EVP_MAX_UNITS[max(EVP_MAX_UNITS)]
    # larger sectors keep EVP for at least as long
    sizes = sorted(EVP_MAX_UNITS)
    assert all(EVP_MAX_UNITS[a] <= EVP_MAX_UNITS[b] for a, b in itertools.pairwise(sizes))


@pytest.mark.parametrize(("spec", "key_bytes", "engine"), [
    ("aes-xts-plain64", 64, "chacha"),  # no such engine
    ("camellia-xts-plain64", 64, "openssl-evp"),  # EVP here is AES only
    ("aes-xts-plain64", 48, "openssl-evp"),  # OpenSSL has no AES-192-XTS
    ("aes-cbc-essiv:sha256", 32, "openssl-evp"),  # only XTS has engines
    ("aes-ecb", 32, "openssl-evp+c"),
])
def test_an_engine_that_cannot_do_it_is_refused(spec: str, key_bytes: int, engine: str) -> None:
    with pytest.raises(ValueError, match=re.escape(engine)):
        SectorCipher(CipherSpec.parse(spec), os.urandom(key_bytes), engine=engine)


def test_modes_and_iv_generators_come_from_their_tables() -> None:
    assert MODES == ("xts", "cbc", "ecb", "ctr")
    assert set(IVGENS) == {"plain64", "plain", "plain64be", "essiv", "benbi", "null"}
    for mode in ("xts", "cbc", "ctr"):
        for iv in IVGENS:
            name = f"aes-{mode}-{iv}:sha256" if iv == "essiv" else f"aes-{mode}-{iv}"
            SectorCipher(CipherSpec.parse(name), os.urandom(64 if mode == "xts" else 32))
