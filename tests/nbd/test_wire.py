from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdluks.nbd.constants import MAX_PAYLOAD, Cmd
from nbdluks.nbd.wire import (
    ChunkHeader,
    ProtocolError,
    Request,
    RequestDecoder,
    SimpleReply,
    decode_reply_header,
    encode_block_status,
    encode_chunk_header,
    encode_error_chunk,
    encode_export_name_reply,
    encode_greeting,
    encode_offset_data_header,
    encode_offset_hole,
    encode_request,
    encode_simple_reply,
)


def test_greeting_bytes_match_the_spec() -> None:
    assert encode_greeting(3) == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


def test_export_name_reply_zero_padding() -> None:
    assert len(encode_export_name_reply(1, 1, no_zeroes=False)) == 8 + 2 + 124
    assert len(encode_export_name_reply(1, 1, no_zeroes=True)) == 10


def test_simple_reply_layout() -> None:
    assert encode_simple_reply(0x1122334455667788, 22) == (
        struct.pack(">I", 0x67446698) + struct.pack(">I", 22) + bytes.fromhex("1122334455667788")
    )


def test_chunk_layouts() -> None:
    hdr = encode_chunk_header(7, 1, 100, done=True)
    assert hdr == struct.pack(">IHHQI", 0x668E33EF, 1, 1, 7, 100)
    data = encode_offset_data_header(7, 4096, 512, done=False)
    assert data == struct.pack(">IHHQIQ", 0x668E33EF, 0, 1, 7, 520, 4096)
    hole = encode_offset_hole(7, 0, 65536, done=True)
    assert hole == struct.pack(">IHHQIQI", 0x668E33EF, 1, 2, 7, 12, 0, 65536)
    err = encode_error_chunk(7, 5, "boom")
    assert err == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 7, 10, 5, 4) + b"boom"
    bs = encode_block_status(7, 1, [(4096, 3), (512, 0)], done=True)
    assert bs == struct.pack(">IHHQII", 0x668E33EF, 1, 5, 7, 20, 1) + struct.pack(
        ">IIII", 4096, 3, 512, 0
    )


def test_reply_header_decoding() -> None:
    assert decode_reply_header(encode_simple_reply(5, 1)) == SimpleReply(5, 1)
    assert decode_reply_header(encode_chunk_header(5, 1, 8, True)) == ChunkHeader(1, 1, 5, 8)
    with pytest.raises(ProtocolError):
        decode_reply_header(b"\0" * 20)


def test_decoder_splits_requests_and_write_payloads_at_any_boundary() -> None:
    stream = (
        encode_request(0, Cmd.READ, 1, 0, 4096)
        + encode_request(1, Cmd.WRITE, 2, 512, 5)
        + b"hello"
        + encode_request(0, Cmd.FLUSH, 3, 0, 0)
    )
    for step in (1, 3, 7, 28, 33, len(stream)):
        dec = RequestDecoder()
        reqs = []
        for i in range(0, len(stream), step):
            reqs += dec.feed(stream[i : i + step])
        assert [(r.cmd, r.handle, r.offset, r.length) for r in reqs] == [
            (Cmd.READ, 1, 0, 4096),
            (Cmd.WRITE, 2, 512, 5),
            (Cmd.FLUSH, 3, 0, 0),
        ]
        assert reqs[1].data == b"hello" and reqs[1].flags == 1


def test_decoder_skips_oversized_write_and_stays_in_sync() -> None:
    dec = RequestDecoder(max_payload=16)
    stream = encode_request(0, Cmd.WRITE, 1, 0, 40) + b"x" * 40 + encode_request(0, 0, 2, 0, 1)
    reqs = dec.feed(stream)
    assert [r.handle for r in reqs] == [1, 2]
    assert reqs[0].oversized and not reqs[1].oversized


def test_a_write_holds_what_came_never_what_it_announced() -> None:
    asked: list[int] = []

    def alloc(n: int) -> bytearray:
        asked.append(n)
        return bytearray(n)

    dec = RequestDecoder(alloc=alloc)
    length = 64 << 20
    assert dec.feed(encode_request(0, Cmd.WRITE, 1, 0, length) + b"x") == []
    assert dec.mid_write and dec.partial == 1 and dec.data_in == 1
    assert asked == []  # no buffer of the announced 64 MiB
    payload = bytes(range(256)) * (length // 256)
    dec.data_in = 0
    reqs: list[Request] = []
    pos = 1
    # large parts (kept as views), small ones (gathered), a mutable buffer
    for size in (1 << 20, 7, 100_000, 3, 1, 5 << 20):
        reqs += dec.feed(payload[pos:pos + size])
        pos += size
    chunk = bytearray(payload[pos:pos + (1 << 20)])
    reqs += dec.feed(chunk)
    chunk[:] = bytes(len(chunk))  # a fed buffer may change afterwards
    pos += 1 << 20
    assert dec.partial == pos and asked == []
    reqs += dec.feed(payload[pos:] + encode_request(0, Cmd.FLUSH, 2, 0, 0))
    assert [r.handle for r in reqs] == [1, 2]
    assert asked == [length] and reqs[0].data == b"x" + payload[1:]
    assert dec.data_in == length - 1 and not dec.mid_write and dec.partial == 0


def test_an_abandoned_write_gives_back_what_it_held() -> None:
    dec = RequestDecoder()
    dec.feed(encode_request(0, Cmd.WRITE, 1, 0, 1000) + b"y" * 300)
    assert dec.abandon() == 300 and not dec.mid_write and dec.abandon() == 0


def test_decoder_rejects_bad_magic() -> None:
    with pytest.raises(ProtocolError):
        RequestDecoder().feed(b"\xff" * 28)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=64))
def test_decoder_fuzz_never_crashes(data: bytes, step: int) -> None:
    dec = RequestDecoder(max_payload=64)
    try:
        for i in range(0, len(data), step):
            for req in dec.feed(data[i : i + step]):
                if req.cmd == Cmd.WRITE and not req.oversized:
                    assert req.data is not None and len(req.data) == req.length
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 0xFFFF), st.integers(0, 7), st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1), st.integers(0, 200),
        ),
        max_size=10,
    ),
    st.integers(min_value=1, max_value=100),
)
def test_decoder_round_trips_request_streams(reqs: list[tuple[int, int, int, int, int]],
                                             step: int) -> None:
    stream = b""
    for flags, cmd, handle, offset, length in reqs:
        stream += encode_request(flags, cmd, handle, offset, length)
        if cmd == Cmd.WRITE:
            stream += bytes([handle & 0xFF]) * length
    dec = RequestDecoder(max_payload=MAX_PAYLOAD)
    got = []
    for i in range(0, len(stream), step):
        got += dec.feed(stream[i : i + step])
    assert [(r.flags, r.cmd, r.handle, r.offset, r.length) for r in got] == reqs
    for r in got:
        if r.cmd == Cmd.WRITE:
            assert r.data == bytes([r.handle & 0xFF]) * r.length


def test_client_side_decoders_read_what_the_encoders_wrote() -> None:
    from nbdluks.nbd.constants import Info
    from nbdluks.nbd.wire import (
        RemoteProtocolError,
        decode_error_chunk,
        decode_info,
        decode_offset,
        decode_offset_hole,
        encode_info_block_size,
        encode_info_export,
        encode_info_name,
        reply_header_size,
    )

    assert decode_info(encode_info_export(1 << 40, 0x1234)) == (Info.EXPORT, (1 << 40, 0x1234))
    assert decode_info(encode_info_block_size(512, 4096, 1 << 25)) == (
        Info.BLOCK_SIZE, (512, 4096, 1 << 25))
    assert decode_info(encode_info_name("x")) == (Info.NAME, ())
    with pytest.raises(RemoteProtocolError):
        decode_info(encode_info_export(1, 1)[:-1])
    chunk = encode_offset_hole(7, 1 << 33, 4096, True)
    assert reply_header_size(chunk[:4]) == 20
    assert decode_offset_hole(chunk[20:]) == (1 << 33, 4096)
    assert decode_offset(encode_offset_data_header(7, 99, 1, False)[20:]) == 99
    assert reply_header_size(encode_simple_reply(1)[:4]) == 16
    with pytest.raises(RemoteProtocolError):
        reply_header_size(b"\0\0\0\0")
    err = encode_error_chunk(7, 5, "disk on fire")
    assert decode_error_chunk(err[20:]) == (5, "disk on fire")
    with pytest.raises(RemoteProtocolError):
        decode_error_chunk(err[20:25])
