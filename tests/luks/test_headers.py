"""Damaged, truncated, hostile and unsupported headers: a clear error that
names the reason, or (a damaged primary) the secondary copy with a warning."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdluks.block.file import FileDevice
from nbdluks.luks import header
from nbdluks.luks.errors import Argon2MemoryError, HeaderError, NotLuksError, UnsupportedError
from nbdluks.luks.unlock import SlotsSkippedError
from nbdluks.luks.volume import HEADER_PROBE
from nbdluks.unlock.headers import read_header
from nbdluks.unlock.keys import UnlockOptions
from tests.conftest import need, pattern
from tests.luks.opening import open_luks
from tests.luks.reference import Made, fill, luks_format

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("cryptsetup")


def parse_file(path: Path, **kw: Any) -> Any:
    with open(path, "rb") as f:
        return header.parse(f.read(HEADER_PROBE), **kw)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def rewrite_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the LUKS2 JSON of both copies and recompute their checksums
    (independently of nbdluks' parser)."""
    with open(path, "r+b") as f:
        first = f.read(4096)
        hdr_size = struct.unpack_from(">Q", first, 8)[0]
        for off in (0, hdr_size):
            f.seek(off)
            block = bytearray(f.read(hdr_size))
            md = json.loads(block[4096:].split(b"\0", 1)[0])
            edit(md)
            text = json.dumps(md).encode()
            block[4096:] = text + bytes(hdr_size - 4096 - len(text))
            block[448 : 448 + 64] = bytes(64)
            block[448 : 448 + 32] = hashlib.sha256(block).digest()
            f.seek(off)
            f.write(block)


@pytest.fixture
def luks2(tmp_path: Path) -> Made:
    made = luks_format(tmp_path, detached=True, size=MiB)
    fill(made, pattern(MiB, seed=1))
    return made


def open_it(made: Made) -> tuple[Any, Any, Any]:
    return open_luks(str(made.payload), str(made.header_path),
                     UnlockOptions(key_file=str(made.payload.parent / "vol.pass")), read_only=True)


def test_damaged_primary_opens_through_secondary(luks2: Made) -> None:
    assert luks2.header
    flip(luks2.header, 4096 + 10)  # inside the primary JSON area
    damaged = luks2.header.read_bytes()
    vol = parse_file(luks2.header)
    assert vol.copy == "secondary"
    assert any("secondary" in w and "primary" in w and "checksum" in w for w in vol.warnings)
    dev, vol, _slot = open_it(luks2)
    with dev:
        buf = bytearray(4096)
        dev.pread_into(memoryview(buf), 0)
    assert bytes(buf) == pattern(MiB, seed=1)[:4096]
    # nbdluks never repairs the header on its own
    assert luks2.header.read_bytes() == damaged


def test_damaged_primary_magic_still_found(luks2: Made) -> None:
    assert luks2.header
    flip(luks2.header, 0)
    assert parse_file(luks2.header).copy == "secondary"


def test_both_copies_damaged_is_a_clear_error(luks2: Made) -> None:
    assert luks2.header
    flip(luks2.header, 4096 + 10)
    flip(luks2.header, 16384 + 4096 + 10)
    with pytest.raises(HeaderError, match="checksum"):
        parse_file(luks2.header)


def test_higher_seqid_wins(luks2: Made) -> None:
    assert luks2.header
    vol = parse_file(luks2.header)
    assert vol.copy == "primary" and not vol.warnings


@pytest.mark.parametrize("cut", [0, 5, 100, 4096, 16384 + 100])
def test_truncated_header(tmp_path: Path, luks2: Made, cut: int) -> None:
    assert luks2.header
    short = tmp_path / "short"
    short.write_bytes(luks2.header.read_bytes()[:cut])
    with pytest.raises((HeaderError, NotLuksError)), FileDevice(str(short)) as dev:
        read_header(dev)


def test_not_luks(tmp_path: Path) -> None:
    p = tmp_path / "zeros"
    p.write_bytes(bytes(MiB))
    with pytest.raises(NotLuksError, match="not a LUKS header"):
        parse_file(p)


def test_unknown_mandatory_requirement_is_shown_and_refused_by_name(luks2: Made) -> None:
    assert luks2.header
    rewrite_json(luks2.header, lambda md: md["config"].update(
        requirements={"mandatory": ["future-feature"]}))
    vol = parse_file(luks2.header)  # inspect still shows it
    assert vol.unservable and "future-feature" in vol.unservable
    with pytest.raises(UnsupportedError, match=r"cannot be served: .*future-feature"):
        open_it(luks2)


def test_two_segments_shown_and_refused(luks2: Made) -> None:
    assert luks2.header

    def edit(md: dict[str, Any]) -> None:
        seg = dict(md["segments"]["0"])
        md["segments"]["0"]["size"] = "4096"
        seg["offset"] = "4096"
        md["segments"]["1"] = seg
        md["digests"]["0"]["segments"].append("1")

    rewrite_json(luks2.header, edit)
    assert "2 segments" in (parse_file(luks2.header).unservable or "")
    with pytest.raises(UnsupportedError, match="2 segments"):
        open_it(luks2)


def test_integrity_segment_shown_and_refused(luks2: Made) -> None:
    assert luks2.header
    rewrite_json(luks2.header, lambda md: md["segments"]["0"].update(
        integrity={"type": "hmac(sha256)", "journal_encryption": "none",
                   "journal_integrity": "none"}))
    assert "dm-integrity" in (parse_file(luks2.header).unservable or "")
    with pytest.raises(UnsupportedError, match="integrity"):
        open_it(luks2)


def test_hostile_argon2_memory_makes_the_slot_unusable(tmp_path: Path) -> None:
    made = luks_format(tmp_path, detached=True, size=MiB, pbkdf="argon2id")
    assert made.header
    rewrite_json(made.header, lambda md: md["keyslots"]["0"]["kdf"].update(memory=8 << 20))
    vol = parse_file(made.header)
    assert not vol.keyslots and isinstance(vol.unusable[0].reason, Argon2MemoryError)
    with pytest.raises(SlotsSkippedError, match="above the cap") as e:
        open_it(made)
    assert isinstance(e.value.skipped[0], Argon2MemoryError)
    # a lower cap refuses the original too; a raised one accepts
    rewrite_json(made.header, lambda md: md["keyslots"]["0"]["kdf"].update(memory=64))
    assert parse_file(made.header, argon2_max_kib=32).unusable
    assert parse_file(made.header, argon2_max_kib=64).keyslots[0].kdf.memory == 64


@pytest.mark.parametrize(("field", "value"), [("time", 0), ("cpus", 0), ("memory", 0)])
def test_hostile_argon2_zero_parameters(tmp_path: Path, field: str, value: int) -> None:
    made = luks_format(tmp_path, detached=True, size=MiB, pbkdf="argon2i")
    assert made.header
    rewrite_json(made.header, lambda md: md["keyslots"]["0"]["kdf"].update({field: value}))
    vol = parse_file(made.header)
    assert not vol.keyslots and field in str(vol.unusable[0].reason)
    with pytest.raises(SlotsSkippedError, match=f"no usable key slot .*{field}"):
        open_it(made)


def test_keyslot_area_outside_keyslots_area(luks2: Made) -> None:
    assert luks2.header
    rewrite_json(luks2.header, lambda md: md["keyslots"]["0"]["area"].update(
        offset=str(1 << 40)))
    with pytest.raises(HeaderError, match="beyond the keyslots area"):
        parse_file(luks2.header)


def test_digest_naming_missing_keyslot(luks2: Made) -> None:
    assert luks2.header
    rewrite_json(luks2.header, lambda md: md["digests"]["0"].update(keyslots=["0", "9"]))
    with pytest.raises(HeaderError, match="keyslot '9'"):
        parse_file(luks2.header)


def test_attached_segment_overlapping_header_refused(tmp_path: Path) -> None:
    made = luks_format(tmp_path, size=18 * MiB)
    rewrite_json(made.payload, lambda md: md["segments"]["0"].update(offset="4096"))
    with pytest.raises(HeaderError, match="runs into the data"):
        open_it(made)


def test_luks1_serpent_refused_by_name(tmp_path: Path) -> None:
    made = luks_format(tmp_path, version=1, size=3 * MiB)
    with open(made.payload, "r+b") as f:
        f.seek(8)
        f.write(b"serpent".ljust(32, b"\0"))
    vol = parse_file(made.payload)  # inspect still works
    assert vol.segment.cipher == "serpent-xts-plain64"
    with pytest.raises(UnsupportedError, match="serpent"):
        open_it(made)


def test_luks1_overlapping_slots_bad_stripes_and_a_corrupt_state(tmp_path: Path) -> None:
    made = luks_format(tmp_path, version=1, size=3 * MiB)
    data = bytearray(made.payload.read_bytes()[: 2 * MiB])
    # slot 1 (inactive) at slot 0's key material offset: cryptsetup refuses that too
    km0 = struct.unpack_from(">I", data, 208 + 40)[0]
    struct.pack_into(">I", data, 208 + 48 + 40, km0)
    with pytest.raises(HeaderError, match="overlap"):
        header.parse(bytes(data))
    made2 = luks_format(tmp_path, version=1, size=3 * MiB, name="v2")
    data = bytearray(made2.payload.read_bytes()[: 2 * MiB])
    struct.pack_into(">I", data, 208 + 48 * 3 + 44, 3999)
    with pytest.raises(HeaderError, match="stripes"):
        header.parse(bytes(data))
    struct.pack_into(">I", data, 208 + 48 * 3 + 44, 4000)
    struct.pack_into(">I", data, 208 + 48 * 3, 0x12345678)  # a corrupt state: unusable only
    vol = header.parse(bytes(data))
    assert [s.id for s in vol.keyslots] == [0] and "corrupt state" in str(vol.unusable[0].reason)


def test_a_healthy_header_is_read_in_two_small_reads(luks2: Made) -> None:
    """Two reads of the header device: 4 KiB, then both LUKS2 copies (not the
    8 MiB probe), and the result is the whole probe's."""
    from nbdluks.block import FileDevice
    from nbdluks.luks.volume import HEADER_PROBE
    from nbdluks.unlock.headers import read_header

    class Counting(FileDevice):
        reads: list[int] = []

        def _pread_into(self, buf: memoryview, offset: int) -> None:
            self.reads.append(len(buf))
            super()._pread_into(buf, offset)

    dev = Counting(str(luks2.header_path), read_only=True)
    with dev:
        vol, _ = read_header(dev)
    assert dev.reads == [4096, 2 * 16384]
    with open(luks2.header_path, "rb") as f:
        whole = header.parse(f.read(HEADER_PROBE))
    assert vol.identity() == whole.identity() and vol.copy == whole.copy


def test_a_damaged_primary_is_read_whole(luks2: Made) -> None:
    assert luks2.header
    flip(luks2.header, 100)  # inside the primary's binary header: its checksum fails
    dev, vol, _ = open_it(luks2)
    with dev:
        assert vol.copy == "secondary"
