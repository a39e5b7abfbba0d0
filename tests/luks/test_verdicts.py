"""Which headers are valid: the same verdict as `cryptsetup luksDump` on
mutations of headers that `cryptsetup luksFormat` made. Each case states
the verdict it expects, and cryptsetup must agree with it, so a case that
stops testing what it claims fails too.

"accept" cases that nbdluks cannot use fully say how: a key slot unusable
(and the others still open the volume), or the volume unservable.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdluks.luks import header
from nbdluks.luks.errors import LuksError
from nbdluks.luks.volume import HEADER_PROBE, Volume
from tests.conftest import need
from tests.luks.reference import add_key, luks_format

MiB = 1 << 20
Md = dict[str, Any]


def write_area(path: Path, edit: Callable[[bytes], bytes]) -> None:
    """Replace the JSON area of both LUKS2 copies (same length), fixing the checksums."""
    with open(path, "r+b") as f:
        hdr_size = struct.unpack_from(">Q", f.read(16), 8)[0]
        for off in (0, hdr_size):
            f.seek(off)
            block = bytearray(f.read(hdr_size))
            area = edit(bytes(block[4096:]))
            assert len(area) == hdr_size - 4096
            block[4096:] = area
            block[448 : 448 + 64] = bytes(64)
            block[448 : 448 + 32] = hashlib.sha256(block).digest()
            f.seek(off)
            f.write(block)


def write_json(path: Path, edit: Callable[[Md], None]) -> None:
    def rewrite(area: bytes) -> bytes:
        md = json.loads(area.split(b"\0", 1)[0])
        edit(md)
        text = json.dumps(md, separators=(",", ":")).encode()
        return text + bytes(len(area) - len(text))

    write_area(path, rewrite)


def cryptsetup_accepts(path: Path, tmp: Path) -> bool:
    probe = tmp / "probe.img"  # luksDump may repair a file: never the one we parse
    shutil.copyfile(path, probe)
    p = subprocess.run(["cryptsetup", "luksDump", str(probe)], capture_output=True, text=True,
                       timeout=60)
    return p.returncode == 0


def ours(path: Path) -> Volume | LuksError:
    with open(path, "rb") as f:
        data = f.read(HEADER_PROBE)
    try:
        return header.parse(data)
    except LuksError as e:
        return e


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LUKS2 header with two pbkdf2 key slots and a token."""
    need("cryptsetup")
    tmp = tmp_path_factory.mktemp("verdicts")
    made = luks_format(tmp, detached=True, size=MiB)
    assert made.header
    (tmp / "pass2").write_bytes(b"second")
    add_key(made.header, tmp / "vol.pass", tmp / "pass2")
    (tmp / "token.json").write_text(json.dumps({"type": "example", "keyslots": ["1"]}))
    subprocess.run(["cryptsetup", "token", "import", "--json-file", str(tmp / "token.json"),
                    str(made.header)], check=True, capture_output=True)
    return made.header


def _set(*path: str, value: Any) -> Callable[[Md], None]:
    def edit(md: Md) -> None:
        obj = md
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value
    return edit


def _del(*path: str) -> Callable[[Md], None]:
    def edit(md: Md) -> None:
        obj = md
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]
    return edit


def _second_segment(kind: str = "crypt") -> Callable[[Md], None]:
    def edit(md: Md) -> None:
        seg = copy.deepcopy(md["segments"]["0"])
        md["segments"]["0"]["size"] = "524288"
        seg["offset"], seg["type"] = "524288", kind
        md["segments"]["1"] = seg
        md["digests"]["0"]["segments"].append("1")
    return edit


def _two_digests(md: Md) -> None:
    md["digests"]["1"] = copy.deepcopy(md["digests"]["0"])


def _areas_overlap(md: Md) -> None:
    md["keyslots"]["1"]["area"]["offset"] = md["keyslots"]["0"]["area"]["offset"]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _leading_space(area: bytes) -> bytes:
    return b" " + area[:-1]


def _garbage_after_nul(area: bytes) -> bytes:
    return area[:-1] + b"x"


def _spaces_after_json(area: bytes) -> bytes:
    end = area.index(b"\0")
    return area[:end] + b" " + area[end + 1 :]


def _text_after_json(area: bytes) -> bytes:
    end = area.index(b"\0")
    return area[:end] + b" x" + area[end + 2 :]


def _no_nul(area: bytes) -> bytes:
    end = area.index(b"\0")
    return area[:end] + b" " * (len(area) - end)


# (name, edit of the JSON or of the raw area, cryptsetup's verdict)
REFUSED: list[tuple[str, Callable[..., Any], str]] = [
    ("leading whitespace", _leading_space, "area"),
    ("a byte after the terminating NUL", _garbage_after_nul, "area"),
    ("no terminating NUL", _no_nul, "area"),
    ("text after the JSON object", _text_after_json, "area"),
    ("a keyslot in two digests", _two_digests, "json"),
    ("a keyslot in no digest", _set("digests", "0", "keyslots", value=["0"]), "json"),
    ("a digest naming a missing keyslot", _set("digests", "0", "keyslots",
                                                 value=["0", "1", "7"]), "json"),
    ("a digest naming a missing segment", _set("digests", "0", "segments",
                                                 value=["0", "3"]), "json"),
    ("a crypt segment in no digest", _set("digests", "0", "segments", value=[]), "json"),
    ("JSON nested 32 levels deep (json-c's limit)", _set("config", "x", value=_nested(30)),
     "json"),
    ("a token naming a missing keyslot", _set("tokens", "0", "keyslots", value=["5"]), "json"),
    ("a token keyslot that is a number", _set("tokens", "0", "keyslots", value=[1]), "json"),
    ("a token without a type", _del("tokens", "0", "type"), "json"),
    ("tokens missing", _del("tokens"), "json"),
    ("tokens not an object", _set("tokens", value=[]), "json"),
    ("segment flags not strings", _set("segments", "0", "flags", value=[1]), "json"),
    ("segment flags not an array", _set("segments", "0", "flags", value="x"), "json"),
    ("an empty encryption", _set("segments", "0", "encryption", value=""), "json"),
    ("encryption not a string", _set("segments", "0", "encryption", value=5), "json"),
    ("segment offset not a number", _set("segments", "0", "offset", value="abc"), "json"),
    ("segment offset unaligned", _set("segments", "0", "offset", value="513"), "json"),
    ("segment size zero", _set("segments", "0", "size", value="0"), "json"),
    ("segment size unaligned to its sector", _set("segments", "0", "size", value="1536"),
     "json"),
    ("sector size zero", _set("segments", "0", "sector_size", value=0), "json"),
    ("sector size not a multiple of 512", _set("segments", "0", "sector_size", value=1000),
     "json"),
    ("sector size a string", _set("segments", "0", "sector_size", value="512"), "json"),
    ("iv_tweak not a number", _set("segments", "0", "iv_tweak", value="-1"), "json"),
    ("an integrity object without fields", _set("segments", "0", "integrity",
                                                  value={"type": "hmac(sha256)"}), "json"),
    ("no segment", _set("segments", value={}), "json"),
    ("a gap at segment 0", lambda md: md["segments"].update({"1": md["segments"].pop("0")}),
     "json"),
    ("keyslots_size unaligned", _set("config", "keyslots_size", value="4095"), "json"),
    ("keyslots_size above 128 MiB", _set("config", "keyslots_size", value=str(256 * MiB)),
     "json"),
    ("json_size not the area's", _set("config", "json_size", value="28672"), "json"),
    ("json_size not a number", _set("config", "json_size", value="x"), "json"),
    ("config flags not strings", _set("config", "flags", value=[7]), "json"),
    ("mandatory requirements not an array", _set("config", "requirements",
                                                  value={"mandatory": "x"}), "json"),
    ("two online-reencrypt requirements", _set("config", "requirements", value={
        "mandatory": ["online-reencrypt", "online-reencrypt-v2"]}), "json"),
    ("online-reencrypt without backup segments", _set("config", "requirements", value={
        "mandatory": ["online-reencrypt-v2"]}), "json"),
    ("a keyslot id that is not a number", lambda md: md["keyslots"].update(
        {"x": md["keyslots"].pop("1")}), "json"),
    ("a keyslot key_size below zero", _set("keyslots", "0", "key_size", value=-1), "json"),
    ("a keyslot key_size as a string", _set("keyslots", "0", "key_size", value="64"), "json"),
    ("a keyslot without a type", _del("keyslots", "1", "type"), "json"),
    ("keyslot areas overlapping", _areas_overlap, "json"),
    ("a keyslot area inside the metadata", _set("keyslots", "0", "area", "offset",
                                                 value="4096"), "json"),
    ("a keyslot area beyond the keyslots area", _set("keyslots", "0", "area", "offset",
                                                      value=str(1 << 30)), "json"),
    ("a keyslot area of size zero", _set("keyslots", "0", "area", "size", value="0"), "json"),
    ("an unknown AF type", _set("keyslots", "1", "af", "type", value="luks2"), "json"),
    ("an unknown area type", _set("keyslots", "1", "area", "type", value="lvm"), "json"),
    ("a pbkdf2 KDF without its hash", _del("keyslots", "1", "kdf", "hash"), "json"),
    ("an AF without stripes", _del("keyslots", "1", "af", "stripes"), "json"),
    ("data inside the keyslots area", _set("segments", "0", "offset", value="65536"), "json"),
]

# (name, edit, how nbdluks takes it: "slot 1" unusable / "unservable" / "ok")
ACCEPTED: list[tuple[str, Callable[..., Any], str]] = [
    ("an unknown KDF type (old 'argon2')", _set("keyslots", "1", "kdf", "type",
                                                value="argon2"), "slot 1"),
    ("an unknown keyslot type", _set("keyslots", "1", "type", value="future"), "slot 1"),
    ("pbkdf2 with zero iterations", _set("keyslots", "1", "kdf", "iterations", value=0),
     "slot 1"),
    ("an unavailable AF hash", _set("keyslots", "1", "af", "hash", value="nohash"), "slot 1"),
    ("an unknown token type", _set("tokens", "0", "type", value="tpm3"), "ok"),
    ("an extra KDF field (cryptsetup drops it)", _set("keyslots", "1", "kdf", "extra",
                                                      value=1), "ok"),
    ("a priority that is not a number", _set("keyslots", "1", "priority", value="x"), "ok"),
    ("two segments", _second_segment(), "unservable"),
    ("a segment of another type", _set("segments", "0", "type", value="linear"),
     "unservable"),
    ("dm-integrity", _set("segments", "0", "integrity", value={
        "type": "hmac(sha256)", "journal_encryption": "none", "journal_integrity": "none"}),
     "unservable"),
    ("an unknown mandatory requirement", _set("config", "requirements", value={
        "mandatory": ["future-feature"]}), "unservable"),
    ("a cipher we lack", _set("segments", "0", "encryption", value="serpent-xts-plain64"),
     "unservable"),
    ("an 8 KiB sector", _set("segments", "0", "sector_size", value=8192), "unservable"),
    ("an unknown digest type", _set("digests", "0", "type", value="future"), "unservable"),
    ("JSON nested 31 levels deep", _set("config", "x", value=_nested(29)), "ok"),
    ("a key slot with 2^31 PBKDF2 iterations",
     _set("keyslots", "1", "kdf", "iterations", value=2**31), "slot 1"),
    ("a digest with 2^31 iterations", _set("digests", "0", "iterations", value=2**31),
     "unservable"),
    # found by the hypothesis test below: "base64" that is not even ASCII
    ("a digest salt that is not ASCII", _set("digests", "0", "salt", value="\x80"),
     "unservable"),
    ("a key slot salt that is not ASCII", _set("keyslots", "1", "kdf", "salt", value="\x80"),
     "slot 1"),
    ("a segment with a fixed size", _set("segments", "0", "size", value="1048576"), "ok"),
    ("whitespace between the JSON and its NUL", _spaces_after_json, "area ok"),
    ("segment flags", _set("segments", "0", "flags", value=["x"]), "ok"),
]


def mutate(base: Path, tmp: Path, edit: Callable[..., Any], how: str) -> Path:
    path = tmp / "mutated.img"
    shutil.copyfile(base, path)
    (write_area if how == "area" else write_json)(path, edit)
    return path


def test_the_base_is_valid(base: Path, tmp_path: Path) -> None:
    vol = ours(base)
    assert isinstance(vol, Volume) and cryptsetup_accepts(base, tmp_path)
    assert [s.id for s in vol.keyslots] == [0, 1] and vol.unservable is None
    assert [(t.id, t.type, t.keyslots) for t in vol.tokens] == [(0, "example", (1,))]


@pytest.mark.parametrize(("name", "edit", "how"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_like_cryptsetup(base: Path, tmp_path: Path, name: str,
                                 edit: Callable[..., Any], how: str) -> None:
    path = mutate(base, tmp_path, edit, how)
    assert not cryptsetup_accepts(path, tmp_path), "cryptsetup accepts it: the case is wrong"
    result = ours(path)
    assert isinstance(result, LuksError), f"nbdluks accepts: {name}"


@pytest.mark.parametrize(("name", "edit", "effect"), ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_like_cryptsetup(base: Path, tmp_path: Path, name: str,
                                  edit: Callable[..., Any], effect: str) -> None:
    path = mutate(base, tmp_path, edit, "area" if effect == "area ok" else "json")
    assert cryptsetup_accepts(path, tmp_path), "cryptsetup refuses it: the case is wrong"
    vol = ours(path)
    assert isinstance(vol, Volume), f"nbdluks refuses ({vol})"
    if effect == "slot 1":
        assert [s.id for s in vol.keyslots] == [0]
        assert [u.id for u in vol.unusable] == [1] and str(vol.unusable[0].reason)
    elif effect in ("ok", "area ok"):
        assert [s.id for s in vol.keyslots] == [0, 1]
    assert (vol.unservable is not None) == (effect == "unservable"), vol.unservable


# --- LUKS1: binary fields ----------------------------------------------------------


def _slot_field(slot: int, offset: int, fmt: str, value: Any) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        struct.pack_into(fmt, data, 208 + 48 * slot + offset, value)
    return edit


def _field(offset: int, raw: bytes) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        data[offset : offset + len(raw)] = raw
    return edit


def _km_offset_of(slot: int, like: int) -> Callable[[bytearray], None]:
    def edit(data: bytearray) -> None:
        value = struct.unpack_from(">I", data, 208 + 48 * like + 40)[0]
        struct.pack_into(">I", data, 208 + 48 * slot + 40, value)
    return edit


LUKS1: list[tuple[str, Callable[[bytearray], None], str]] = [
    ("stripes of an inactive slot", _slot_field(5, 44, ">I", 3999), "refuse"),
    ("an inactive slot's material over another's", _km_offset_of(6, 7), "refuse"),
    ("key material inside the header", _slot_field(3, 40, ">I", 0), "refuse"),
    ("key material in the payload", _slot_field(7, 40, ">I", 4000), "refuse"),
    ("a hash shorter than 20 bytes", _field(72, b"md5".ljust(32, b"\0")), "refuse"),
    ("an unknown hash", _field(72, b"nohash".ljust(32, b"\0")), "refuse"),
    ("an active slot with zero iterations", _slot_field(1, 4, ">I", 0), "slot 1"),
    ("a slot in a corrupt state", _slot_field(1, 0, ">I", 0x12345678), "slot 1"),
    ("a cipher we lack", _field(8, b"serpent".ljust(32, b"\0")), "unservable"),
    ("whirlpool (OpenSSL's legacy provider)", _field(72, b"whirlpool".ljust(32, b"\0")), "ok"),
    ("a digest with zero iterations", _field(164, bytes(4)), "unservable"),
    ("a slot with 2^31 iterations", _slot_field(1, 4, ">I", 2**31), "slot 1"),
    ("a digest with 2^31 iterations", _field(164, struct.pack(">I", 2**31)), "unservable"),
]


@pytest.fixture(scope="module")
def base1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LUKS1 volume with key slots 0 and 1."""
    need("cryptsetup")
    tmp = tmp_path_factory.mktemp("verdicts1")
    made = luks_format(tmp, version=1, size=3 * MiB)
    (tmp / "pass2").write_bytes(b"second")
    add_key(made.payload, tmp / "vol.pass", tmp / "pass2")
    return made.payload


@pytest.mark.parametrize(("name", "edit", "effect"), LUKS1, ids=[c[0] for c in LUKS1])
def test_luks1_like_cryptsetup(base1: Path, tmp_path: Path, name: str,
                               edit: Callable[[bytearray], None], effect: str) -> None:
    path = tmp_path / "luks1.img"
    data = bytearray(base1.read_bytes())
    edit(data)
    path.write_bytes(data)
    assert cryptsetup_accepts(path, tmp_path) == (effect != "refuse"), "the case is wrong"
    vol = ours(path)
    if effect == "refuse":
        assert isinstance(vol, LuksError), f"nbdluks accepts: {name}"
        return
    assert isinstance(vol, Volume), f"nbdluks refuses ({vol})"
    if effect == "slot 1":
        assert [s.id for s in vol.keyslots] == [0] and [u.id for u in vol.unusable] == [1]
    assert (vol.unservable is not None) == (effect == "unservable"), vol.unservable


# --- hostile metadata: a verdict, never a crash -------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**65) | st.text(max_size=8)
    | st.sampled_from(["0", "1", "dynamic", "512", "crypt", "luks2", "pbkdf2", "argon2id",
                       "raw", "luks1", "sha256", "aes-xts-plain64", "-1", " 7"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    return out


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_metadata_gets_a_verdict_never_a_crash(base: Path, data: st.DataObject
                                                       ) -> None:
    raw = bytearray(base.read_bytes()[: 16384 * 2 + 4096])
    md = json.loads(bytes(raw[4096:16384]).split(b"\0", 1)[0])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(md)
        path = data.draw(st.sampled_from(paths))
        obj = md
        for key in path[:-1]:
            obj = obj[key]
        if data.draw(st.booleans()):
            obj[path[-1]] = data.draw(_JSON)
        else:
            del obj[path[-1]]
    text = json.dumps(md).encode()
    if len(text) >= 16384 - 4096:
        return
    raw[4096:16384] = text + bytes(16384 - 4096 - len(text))
    raw[448 : 448 + 64] = bytes(64)
    raw[448 : 448 + 32] = hashlib.sha256(bytes(raw[:16384])).digest()
    raw[16384:] = bytes(len(raw) - 16384)  # no secondary: the primary alone decides
    try:
        header.parse(bytes(raw))
    except LuksError as e:
        assert "not understood" not in str(e)  # every refusal by a rule


def test_a_primary_nested_past_any_parser_leaves_the_secondary(base: Path, tmp_path: Path
                                                                ) -> None:
    """Nesting Python's own parser cannot follow (RecursionError) damages that
    copy only: the other one opens, as cryptsetup opens it."""
    path = tmp_path / "deep.img"
    shutil.copyfile(base, path)
    with open(path, "r+b") as f:
        hdr_size = struct.unpack_from(">Q", f.read(16), 8)[0]
        f.seek(0)
        block = bytearray(f.read(hdr_size))
        text = bytes(block[4096:]).split(b"\0", 1)[0]
        deep = text.replace(b'"config":{', b'"config":{"x":' + b"[" * 5000 + b"1"
                            + b"]" * 5000 + b",", 1)
        assert deep != text and len(deep) < hdr_size - 4096
        block[4096:] = deep + bytes(hdr_size - 4096 - len(deep))
        block[448 : 448 + 64] = bytes(64)
        block[448 : 448 + 32] = hashlib.sha256(block).digest()
        f.seek(0)
        f.write(block)
    vol = ours(path)
    assert isinstance(vol, Volume), vol
    assert vol.copy == "secondary" and "nested too deeply" in vol.warnings[0]
    assert cryptsetup_accepts(path, tmp_path)
