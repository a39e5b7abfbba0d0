"""Headers edited in memory and written as plans: what the plans write
parses back (our reader) with the change made, in the order the rules ask
for; key slot areas allocated as cryptsetup's gap search does. cryptsetup
judges the results in tests/manage/."""

from __future__ import annotations

import itertools
import secrets

import pytest

from nbdluks.luks import (
    EditError,
    FormatSpec,
    Luks1Header,
    Luks2Header,
    Pbkdf2,
    SlotSpec,
    Sync,
    Write,
    new_header,
    parse_header,
    plan_add_key,
    plan_remove_binding,
    plan_remove_key,
    plan_replace_key,
    unlock_with_passphrase,
)

MiB = 1 << 20


def spec() -> SlotSpec:
    return SlotSpec(Pbkdf2("sha256", 1000, secrets.token_bytes(32)), "aes-xts-plain64", 64,
                    "sha256")


class Disk:
    """A header device as bytes, written step by step."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.syncs: list[int] = []  # bytes written before each sync

    def apply(self, steps: list[Write | Sync]) -> None:
        written = 0
        for step in steps:
            if isinstance(step, Write):
                self.data[step.offset : step.offset + len(step.data)] = step.data
                written += len(step.data)
            else:
                self.syncs.append(written)

    def volume(self):  # type: ignore[no-untyped-def]
        return parse_header(bytes(self.data[: 8 * MiB]))

    def opens(self, passphrase: bytes) -> int | None:
        vol = self.volume()
        try:
            return unlock_with_passphrase(vol, passphrase, lambda s: bytes(
                self.data[s.area_offset : s.area_offset + s.area_size])).keyslot
        except Exception:
            return None


def formatted(version: int) -> tuple[Disk, Luks1Header | Luks2Header, bytearray]:
    key = bytearray(secrets.token_bytes(64))
    made = new_header(FormatSpec(version=version, sector_size=512), key, detached=True,
                      room=None)
    disk = Disk(made.header_size)
    plan = plan_add_key(made.header, key, b"first", spec())
    disk.apply([*made.wipe, *plan.steps])
    return disk, made.header, key


@pytest.mark.parametrize("version", [1, 2])
def test_material_is_synced_before_the_header_that_points_to_it(version: int) -> None:
    disk, header, key = formatted(version)
    plan = plan_add_key(header, key, b"second", spec())
    material = plan.steps[0]
    assert isinstance(material, Write) and isinstance(plan.steps[1], Sync)
    headers = [s for s in plan.steps[2:] if isinstance(s, Write)]
    assert all(s.offset < material.offset for s in headers)
    assert isinstance(plan.steps[-1], Sync)
    disk.apply(plan.steps)
    assert disk.opens(b"second") == 1 and disk.opens(b"first") == 0


def test_luks2_writes_both_copies_primary_first_each_in_one_write() -> None:
    disk, header, key = formatted(2)
    assert isinstance(header, Luks2Header)
    seqid = header.seqid
    steps = header.writes()
    hdr = header.binary.hdr_size
    assert [(type(s).__name__, getattr(s, "offset", None)) for s in steps] == [
        ("Write", 0), ("Sync", None), ("Write", hdr), ("Sync", None)]
    plan = plan_add_key(header, key, b"second", spec()).steps
    disk.apply(plan[:2])  # the new slot's area, synced
    before = bytes(disk.data)
    # a crash in the middle of the primary's write: the old secondary serves
    first = plan[2]
    assert isinstance(first, Write) and first.offset == 0
    for cut in (512, 4096, 4096 + 100):  # (past the JSON text the rest is zeroes)
        torn = Disk(len(before))
        torn.data[:] = before
        torn.data[:cut] = first.data[:cut]
        assert torn.volume().copy == "secondary" and torn.volume().seqid == seqid
        assert torn.opens(b"first") == 0 and torn.opens(b"second") is None
    # a crash after the primary is whole: it wins with the higher seqid
    disk.apply(plan[2:4])
    assert disk.volume().seqid == seqid + 2 and disk.volume().copy == "primary"
    assert disk.opens(b"second") is not None


def test_two_changes_racing_in_any_order_leave_the_header_readable() -> None:
    """On a store without a lock (an NBD export), two add-keys planned from
    the same header and written step by step in every interleaving: each
    copy is one change's or the other's, never one's binary header with the
    other's JSON, so the first key still opens (it did not, once, in CI)."""
    disk, _, key = formatted(2)
    raw = bytes(disk.data)
    plans = []
    for passphrase in (b"A", b"B"):
        header = Luks2Header.from_volume(parse_header(raw[: 8 * MiB]), raw)
        plans.append(plan_add_key(header, key, passphrase, spec()).steps)
    material = [*plans[0][:2], *plans[1][:2]]  # each slot's area, then the headers
    a, b = plans[0][2:], plans[1][2:]
    for picks in itertools.combinations(range(len(a) + len(b)), len(a)):
        race = Disk(len(raw))
        race.data[:] = raw
        ia, ib = iter(a), iter(b)
        race.apply([*material, *(next(ia) if i in picks else next(ib)
                                 for i in range(len(a) + len(b)))])
        assert race.opens(b"first") == 0, picks


def test_areas_fill_the_first_gap() -> None:
    disk, header, key = formatted(2)
    assert isinstance(header, Luks2Header)
    for passphrase in (b"a", b"b", b"c"):
        disk.apply(plan_add_key(header, key, passphrase, spec()).steps)
    first_gap = header.area(1)
    disk.apply(plan_remove_key(header, 1).steps)
    plan = plan_add_key(header, key, b"again", spec())
    assert plan.slot == 1 and header.area(1) == first_gap
    disk.apply(plan.steps)
    assert disk.opens(b"again") == 1 and disk.opens(b"a") is None


def test_a_full_keyslots_area_and_full_slots_are_refused() -> None:
    key = bytearray(secrets.token_bytes(64))
    made = new_header(FormatSpec(sector_size=512, keyslots_size=2 * 258048), key,
                      detached=True, room=None)
    header = made.header
    plan_add_key(header, key, b"1", spec())
    plan_add_key(header, key, b"2", spec())
    with pytest.raises(EditError, match="no room for another key slot"):
        plan_add_key(header, key, b"3", spec())
    _, l1, key1 = formatted(1)
    for i in range(7):
        plan_add_key(l1, key1, b"%d" % i, spec())
    with pytest.raises(EditError, match="all 8 key slots are in use"):
        l1.free_slot()
    with pytest.raises(EditError, match="out of range"):
        l1.free_slot(8)


def test_a_changed_key_keeps_its_slot_number_and_its_tokens() -> None:
    disk, header, key = formatted(2)
    assert isinstance(header, Luks2Header)
    header.add_token({"type": "clevis", "keyslots": ["0"], "jwe": {}})
    disk.apply(header.writes())
    disk.apply(plan_add_key(header, key, b"new", spec(), 5).steps)
    disk.apply(plan_replace_key(header, 0, 5).steps)
    assert disk.opens(b"new") == 0 and disk.opens(b"first") is None
    assert disk.volume().tokens[0].keyslots == (0,)
    assert "5" not in header.slots


def test_a_binding_goes_with_its_slots() -> None:
    disk, header, key = formatted(2)
    assert isinstance(header, Luks2Header)
    plan = plan_add_key(header, key, b"bound", spec(), token={"type": "clevis", "jwe": {}})
    disk.apply(plan.steps)
    assert plan.token == 0 and disk.volume().tokens[0].keyslots == (plan.slot,)
    assert list(header.md["tokens"]["0"]) == ["type", "keyslots", "jwe"]  # as clevis orders
    disk.apply(plan_remove_binding(header, 0).steps)
    assert disk.volume().tokens == () and disk.opens(b"bound") is None
    assert disk.opens(b"first") == 0
