from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nbdluks.nbd.constants import Info, Opt, Rep, TxFlag
from nbdluks.nbd.handshake import ExportInfo, Handshake, State, TlsMode
from nbdluks.nbd.wire import (
    encode_export_request,
    encode_meta_context_request,
    encode_option,
)

EXPORTS = {
    "": ExportInfo("", 1 << 20, TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH, "default disk"),
    "ro": ExportInfo("ro", 4096, TxFlag.HAS_FLAGS | TxFlag.READ_ONLY, min_block=512),
}
CLIENT_FLAGS = struct.pack(">I", 3)


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while data:
        magic, opt, rep, n = struct.unpack(">QIII", data[:20])
        assert magic == 0x3E889045565A9
        out.append((opt, rep, data[20 : 20 + n]))
        data = data[20 + n :]
    return out


def started(tls: TlsMode = TlsMode.OFF) -> Handshake:
    hs = Handshake(EXPORTS, tls)
    assert hs.data_to_send()[:16] == b"NBDMAGICIHAVEOPT"
    hs.receive_data(CLIENT_FLAGS)
    assert hs.state is State.OPTIONS
    return hs


def test_go_with_info_requests() -> None:
    hs = started()
    hs.receive_data(encode_option(Opt.STRUCTURED_REPLY))
    hs.receive_data(
        encode_option(Opt.GO, encode_export_request("", (Info.NAME, Info.DESCRIPTION)))
    )
    rs = replies(hs.data_to_send())
    assert rs[0] == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for _, r, d in rs[1:] if r == Rep.INFO}
    size, flags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == 1 << 20
    assert flags & TxFlag.SEND_DF  # structured replies were negotiated
    assert infos[Info.NAME] == b""
    assert infos[Info.DESCRIPTION] == b"default disk"
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE]) == (1, 4096, 64 << 20)
    assert rs[-1][1] == Rep.ACK
    assert hs.state is State.DONE
    assert hs.result is not None and hs.result.structured and hs.result.no_zeroes


def test_unknown_option_and_export_keep_negotiating() -> None:
    hs = started()
    hs.receive_data(encode_option(99, b"junk"))
    hs.receive_data(encode_option(Opt.INFO, encode_export_request("nope")))
    hs.receive_data(encode_option(Opt.STARTTLS))
    hs.receive_data(encode_option(Opt.EXTENDED_HEADERS))
    hs.receive_data(encode_option(Opt.GO, b"\x00\x00"))  # truncated payload
    rs = replies(hs.data_to_send())
    assert [r for _, r, _ in rs] == [
        Rep.ERR_UNSUP, Rep.ERR_UNKNOWN, Rep.ERR_POLICY, Rep.ERR_UNSUP, Rep.ERR_INVALID
    ]
    assert hs.state is State.OPTIONS


def test_list_and_abort() -> None:
    hs = started()
    hs.receive_data(encode_option(Opt.LIST))
    hs.receive_data(encode_option(Opt.ABORT))
    rs = replies(hs.data_to_send())
    servers = [d for _, r, d in rs if r == Rep.SERVER]
    assert servers[0] == struct.pack(">I", 0) + b"default disk"
    assert servers[1] == struct.pack(">I", 2) + b"ro"
    assert rs[-1] == (Opt.ABORT, Rep.ACK, b"")
    assert hs.state is State.CLOSED


def test_export_name_legacy_reply_and_leftover_requests() -> None:
    hs = Handshake(EXPORTS)
    hs.data_to_send()
    hs.receive_data(struct.pack(">I", 1))  # fixed newstyle, zeroes wanted
    hs.receive_data(encode_option(Opt.EXPORT_NAME, b"ro") + b"REQ")
    out = hs.data_to_send()
    assert len(out) == 8 + 2 + 124
    size, flags = struct.unpack(">QH", out[:10])
    assert size == 4096 and flags & TxFlag.READ_ONLY
    assert hs.state is State.DONE and hs.leftover == b"REQ"


def test_export_name_unknown_closes() -> None:
    hs = started()
    hs.receive_data(encode_option(Opt.EXPORT_NAME, b"missing"))
    assert hs.state is State.CLOSED


def test_meta_contexts() -> None:
    hs = started()
    hs.receive_data(encode_option(Opt.SET_META_CONTEXT, encode_meta_context_request("", ())))
    assert replies(hs.data_to_send())[0][1] == Rep.ERR_INVALID  # needs structured first
    hs.receive_data(encode_option(Opt.STRUCTURED_REPLY))
    hs.receive_data(encode_option(Opt.LIST_META_CONTEXT, encode_meta_context_request("", ())))
    hs.receive_data(
        encode_option(
            Opt.SET_META_CONTEXT,
            encode_meta_context_request("", ("base:allocation", "qemu:dirty-bitmap:x")),
        )
    )
    rs = replies(hs.data_to_send())
    assert rs[1] == (Opt.LIST_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\0base:allocation")
    assert rs[3] == (Opt.SET_META_CONTEXT, Rep.META_CONTEXT, b"\0\0\0\x01base:allocation")
    assert rs[4][1] == Rep.ACK
    hs.receive_data(encode_option(Opt.GO, encode_export_request("")))
    assert hs.result is not None and hs.result.meta_contexts == {1: "base:allocation"}


def test_meta_context_for_another_export_is_void() -> None:
    hs = started()
    hs.receive_data(encode_option(Opt.STRUCTURED_REPLY))
    hs.receive_data(
        encode_option(Opt.SET_META_CONTEXT, encode_meta_context_request("ro", ("base:allocation",)))
    )
    hs.receive_data(encode_option(Opt.GO, encode_export_request("")))
    assert hs.result is not None and hs.result.meta_contexts == {}


def test_oversized_option_is_skipped_with_too_big() -> None:
    hs = started()
    hs.receive_data(encode_option(Opt.INFO, b"\0" * 100_000))
    hs.receive_data(encode_option(Opt.GO, encode_export_request("")))
    rs = replies(hs.data_to_send())
    assert rs[0][1] == Rep.ERR_TOO_BIG
    assert hs.state is State.DONE


def test_bad_option_magic_or_client_flags_close() -> None:
    hs = started()
    hs.receive_data(b"X" * 16)
    assert hs.state is State.CLOSED
    hs = Handshake(EXPORTS)
    hs.receive_data(struct.pack(">I", 0x80))
    assert hs.state is State.CLOSED


option_frames = st.one_of(
    st.builds(encode_option, st.integers(0, 12), st.binary(max_size=64)),
    st.builds(
        lambda o, name, infos: encode_option(o, encode_export_request(name, infos)),
        st.sampled_from([Opt.INFO, Opt.GO]),
        st.sampled_from(["", "ro", "x"]),
        st.lists(st.integers(0, 5), max_size=4).map(tuple),
    ),
    st.builds(
        lambda o, q: encode_option(o, encode_meta_context_request("", q)),
        st.sampled_from([Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]),
        st.lists(st.sampled_from(["base:", "base:allocation", "x:y", ""]), max_size=3).map(tuple),
    ),
    st.binary(max_size=40),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(option_frames, max_size=12), st.integers(1, 50), st.sampled_from(TlsMode))
def test_negotiation_fuzz_never_crashes(frames: list[bytes], step: int, tls: TlsMode) -> None:
    hs = Handshake(EXPORTS, tls)
    stream = CLIENT_FLAGS + b"".join(frames)
    for i in range(0, len(stream), step):
        if hs.state is State.TLS_START:
            hs.tls_started()  # as the adapter does once the TLS handshake is over
        hs.receive_data(stream[i : i + step])
        hs.data_to_send()
    assert hs.state in (State.OPTIONS, State.DONE, State.CLOSED, State.TLS_START)
    if hs.state is State.DONE:
        assert hs.result is not None and hs.result.export.name in EXPORTS
        # with TLS required, no export is reached in the clear
        assert hs.tls_active or tls is not TlsMode.REQUIRE


def test_starttls_then_a_fresh_negotiation() -> None:
    hs = started(TlsMode.ON)
    hs.receive_data(encode_option(Opt.STRUCTURED_REPLY))
    hs.receive_data(encode_option(Opt.STARTTLS, b"x"))  # takes no data
    hs.receive_data(encode_option(Opt.STARTTLS))
    assert [r for _, r, _ in replies(hs.data_to_send())] == [Rep.ACK, Rep.ERR_INVALID, Rep.ACK]
    assert hs.state is State.TLS_START and not hs.tls_active
    hs.tls_started()
    assert hs.state is State.OPTIONS and hs.tls_active
    hs.receive_data(encode_option(Opt.STARTTLS))  # once is enough
    hs.receive_data(encode_option(Opt.GO, encode_export_request("")))
    rs = replies(hs.data_to_send())
    assert rs[0][1] == Rep.ERR_INVALID and rs[-1][1] == Rep.ACK
    assert hs.state is State.DONE and hs.result is not None
    assert not hs.result.structured  # negotiated in the clear: forgotten


def test_bytes_after_starttls_end_the_connection() -> None:
    hs = started(TlsMode.ON)
    hs.receive_data(encode_option(Opt.STARTTLS) + b"\x16\x03\x01")  # ClientHello too early
    assert hs.state is State.CLOSED
    hs = started(TlsMode.ON)
    hs.receive_data(encode_option(Opt.STARTTLS))
    hs.receive_data(b"\x16\x03\x01")  # fed while upgrading: an adapter bug
    assert hs.state is State.CLOSED


def test_tls_required() -> None:
    hs = started(TlsMode.REQUIRE)
    for opt, data in ((Opt.LIST, b""), (Opt.STRUCTURED_REPLY, b""),
                      (Opt.INFO, encode_export_request("")), (Opt.GO, encode_export_request(""))):
        hs.receive_data(encode_option(opt, data))
    assert [r for _, r, _ in replies(hs.data_to_send())] == [Rep.ERR_TLS_REQD] * 4
    assert hs.state is State.OPTIONS
    hs.receive_data(encode_option(Opt.STARTTLS))
    assert replies(hs.data_to_send()) == [(Opt.STARTTLS, Rep.ACK, b"")]
    hs.tls_started()
    hs.receive_data(encode_option(Opt.GO, encode_export_request("")))
    assert hs.state is State.DONE
    # EXPORT_NAME has no error reply: without TLS it ends the connection
    hs = started(TlsMode.REQUIRE)
    hs.receive_data(encode_option(Opt.EXPORT_NAME, b""))
    assert hs.state is State.CLOSED and "TLS" in hs.close_reason
    hs = started(TlsMode.REQUIRE)
    hs.receive_data(encode_option(Opt.ABORT))
    assert replies(hs.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]


def test_an_option_for_an_export_still_coming_waits_then_is_answered() -> None:
    """An option naming an export being unlocked is held (nothing answered,
    later options kept) and answered as if sent when resumed: served once
    ready, ERR_UNKNOWN naming the failure when it could not be opened."""
    exports = dict(EXPORTS)
    waiting, failed = {"slow", "bad"}, set()
    hs = Handshake(exports, waiting=waiting, failed=failed)
    hs.data_to_send()
    hs.receive_data(CLIENT_FLAGS + encode_option(Opt.STRUCTURED_REPLY))
    hs.receive_data(encode_option(Opt.SET_META_CONTEXT, encode_meta_context_request(
        "slow", ["base:allocation"])))
    assert hs.state is State.WAITING and hs.waiting_for == "slow"
    assert [r for _, r, _ in replies(hs.data_to_send())] == [Rep.ACK]  # STRUCTURED only
    hs.receive_data(encode_option(Opt.GO, encode_export_request("slow", ())))  # kept
    assert hs.state is State.WAITING and hs.data_to_send() == b""
    exports["slow"] = ExportInfo("slow", 8192, TxFlag.HAS_FLAGS)
    waiting.discard("slow")
    hs.resume()
    rs = [r for _, r, _ in replies(hs.data_to_send())]
    assert rs == [Rep.META_CONTEXT, Rep.ACK, Rep.INFO, Rep.INFO, Rep.ACK]
    assert hs.state is State.DONE and hs.result is not None
    assert hs.result.export.size == 8192 and hs.result.meta_contexts

    hs = Handshake(exports, waiting=waiting, failed=failed)
    hs.data_to_send()
    hs.receive_data(CLIENT_FLAGS + encode_option(Opt.GO, encode_export_request("bad", ())))
    assert hs.state is State.WAITING and hs.waiting_for == "bad"
    waiting.discard("bad")
    failed.add("bad")
    hs.resume()
    ((opt, rep, msg),) = replies(hs.data_to_send())
    assert (opt, rep) == (Opt.GO, Rep.ERR_UNKNOWN) and b"could not be opened" in msg
    assert hs.state is State.OPTIONS
