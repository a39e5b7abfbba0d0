"""Fuzzing the header parsers: any bytes, and headers that cryptsetup made
with random bytes changed, cut short or shifted, get a Volume or a clean
refusal (LuksError), never another exception; the same for `inspect`'s
description of whatever parses."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdluks.cli.inspect import describe, render_text
from nbdluks.luks import header
from nbdluks.luks.errors import LuksError
from nbdluks.luks.volume import HEADER_PROBE, Volume
from tests.conftest import need
from tests.luks.reference import luks_format

MiB = 1 << 20
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    need("cryptsetup")
    tmp = tmp_path_factory.mktemp("fuzz")
    luks1 = luks_format(tmp, version=1, size=3 * MiB, name="l1")
    luks2 = luks_format(tmp, detached=True, size=MiB, name="l2", pbkdf="argon2id")
    out = {}
    for name, path in (("luks1", luks1.payload), ("luks2", luks2.header)):
        assert path is not None
        with open(path, "rb") as f:
            out[name] = f.read(HEADER_PROBE)
    return out


def verdict(data: bytes) -> Volume | LuksError:
    try:
        vol = header.parse(data)
    except LuksError as e:
        assert str(e)  # a reason, one line
        assert "\n" not in str(e)
        return e
    render_text(describe(vol))  # what inspect shows of it never fails either
    return vol


def rechecksum(data: bytearray) -> None:
    """Make LUKS2 binary headers' checksums right again, so that mutations
    reach the JSON and the key slots instead of failing the checksum."""
    for off in (0, 16384):
        if data[off : off + 4] in (b"LUKS", b"SKUL") and len(data) >= off + 16384:
            size = struct.unpack_from(">Q", data, off + 8)[0]
            if size == 16384:
                block = data[off : off + size]
                block[448 : 448 + 64] = bytes(64)
                block[448 : 448 + 32] = hashlib.sha256(block).digest()
                data[off : off + size] = block


@FUZZ
@given(data=st.binary(max_size=2048))
def test_any_bytes(data: bytes) -> None:
    verdict(data)


@FUZZ
@given(which=st.sampled_from(["luks1", "luks2"]), edits=st.lists(
    st.tuples(st.integers(0, 40000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 40000)), fix=st.booleans())
def test_mutated_headers(headers: dict[str, bytes], which: str,
                         edits: list[tuple[int, int]], cut: int | None, fix: bool) -> None:
    data = bytearray(headers[which])
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    if fix and which == "luks2":
        rechecksum(data)
    verdict(bytes(data if cut is None else data[:cut]))


@FUZZ
@given(which=st.sampled_from(["luks1", "luks2"]), field=st.integers(0, 1024 // 4 - 1),
       value=st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 4000, 4096, 0xDEAD]))
def test_integer_fields(headers: dict[str, bytes], which: str, field: int, value: int) -> None:
    """Big-endian 32-bit words of the binary header set to edge values."""
    data = bytearray(headers[which])
    struct.pack_into(">I", data, field * 4, value)
    if which == "luks2":
        rechecksum(data)
    verdict(bytes(data))
