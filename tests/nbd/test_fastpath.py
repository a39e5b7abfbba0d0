"""The fast path (nbd/_transmit.c, through fastpath.py) against the Python
path it stands in for: for any stream of requests it answers exactly the
leading run of small valid READs, each reply byte for byte what the Python
path sends, over a file and over LUKS volumes cryptsetup made; it stops at
anything else, and at a read that fails, leaving that request unanswered."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdluks import native
from nbdluks.block import BlockDevice, FileDevice
from nbdluks.nbd import fastpath
from nbdluks.nbd.commands import Export, execute, validate
from nbdluks.nbd.constants import REQUEST_SIZE, Cmd, CmdFlag, Errno, TxFlag
from nbdluks.nbd.handshake import Negotiated
from nbdluks.nbd.wire import ProtocolError, Request, RequestDecoder, encode_request
from nbdluks.unlock.keys import UnlockOptions
from tests.luks.opening import open_luks
from tests.luks.reference import fill, luks_format, read_plain

pytestmark = pytest.mark.skipif(not fastpath.AVAILABLE,
                                reason="the C helper is not built, or NBDLUKS_NATIVE=0")
DF, FUA = int(CmdFlag.DF), int(CmdFlag.FUA)
SIZE = 4 << 20


def test_built_where_ci_runs() -> None:
    if os.environ.get("CI") and native.ENABLED:
        assert fastpath.AVAILABLE, "nbdluks/nbd/_transmit.c was not built"


def settled(path: Path, data: bytes | None = None) -> str:
    """`path` (written with `data`) on disk and in the page cache: the fast
    path reads only what the kernel serves without waiting (RWF_NOWAIT), and
    pages under writeback would wait."""
    if data is not None:
        path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)
    return str(path)


@pytest.fixture(scope="module", params=["file", "luks1", "luks2-4k"])
def device(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[BlockDevice]:
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "file":
        dev: BlockDevice = FileDevice(settled(tmp / "f", os.urandom(SIZE)), read_only=True)
    else:
        made = luks_format(tmp, version=1 if request.param == "luks1" else 2,
                           sector_size=4096 if request.param.endswith("4k") else None,
                           size=SIZE + (2 << 20))
        fill(made, os.urandom(SIZE))
        dev, _, _ = open_luks(settled(made.payload), None,
                              UnlockOptions(key_file=str(tmp / "vol.pass")))
        dev.plain = read_plain(made, dev.size)  # type: ignore[attr-defined]
    yield dev
    dev.close()


def negotiated(dev: BlockDevice, structured: bool, df: bool = True) -> Negotiated:
    info = Export("", dev).info()
    flags = info.flags | (TxFlag.SEND_DF if structured and df else 0)
    return Negotiated(info, flags, structured, no_zeroes=True)


def python_replies(dev: BlockDevice, data: bytes, neg: Negotiated) -> list[tuple[Request, bytes]]:
    """The requests `data` starts with, up to the first that is not a READ
    (what follows a WRITE header is its data), and what the Python path
    answers to each valid one."""
    out = []
    for at in range(0, len(data) - REQUEST_SIZE + 1, REQUEST_SIZE):
        try:
            reqs = RequestDecoder().feed(data[at : at + REQUEST_SIZE])
        except ProtocolError:
            break
        if not reqs or reqs[0].cmd != Cmd.READ:
            break
        req, reply = reqs[0], b""
        if validate(req, neg) == Errno.OK:
            reply = b"".join(execute(dev, req, neg))
        out.append((req, reply))
    return out


def taken(req: Request, dev: BlockDevice, neg: Negotiated) -> bool:
    """What the fast path may answer: valid READs of whole units (as long as
    the page cache serves); structured ones without DF from the size where
    holes are looked for only where there is none."""
    direct = dev.direct_read()
    assert direct is not None
    return (req.cmd == Cmd.READ and validate(req, neg) == Errno.OK
            and req.offset % direct.align == 0 and req.length % direct.align == 0
            and req.length <= direct.max_cached
            and not (neg.structured and direct.sparse_min and not req.flags & DF
                     and req.length >= direct.sparse_min
                     and any(e.hole for e in dev.extents(req.offset, req.length))))


def serve_all(reader: fastpath.Reader, data: bytes, limit: int) -> tuple[int, bytes]:
    pos, out = 0, b""
    while True:
        end, replies, n, nbytes = reader.serve(data, pos, limit)
        if replies is None:
            assert (end, n, nbytes) == (pos, 0, 0)
            return pos, out
        assert n == (end - pos) // REQUEST_SIZE and len(replies) > 0
        pos, out = end, out + replies


def sent_all(reader: fastpath.Reader, data: bytes, limit: int, peer: socket.socket
             ) -> tuple[int, bytes]:
    """send() until it stops, as the connection drives it: what the socket
    took (read from its peer), then what it did not (sent by the transport
    before anything else)."""
    pos, out = 0, b""
    while True:
        end, rest, n, _ = reader.send(data, pos, limit)
        out += drain(peer) + (rest or b"")
        if n == 0:
            assert end == pos and rest is None
            return pos, out
        pos = end


def drain(peer: socket.socket) -> bytes:
    got = b""
    while True:
        try:
            chunk = peer.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return got
        got += chunk


def requests(size: int, align: int) -> st.SearchStrategy[bytes]:
    """Streams of requests, mostly READs a client would send, some of every
    kind the fast path must leave alone; sometimes a torn header at the end."""
    aligned = st.builds(lambda n, k: (n * align, k * align),
                        st.integers(0, size // align - 1), st.integers(1, 64 * 1024 // align))
    anything = st.tuples(st.integers(0, size + 8192), st.integers(0, 1200 * 1024))
    one = st.tuples(
        st.sampled_from([Cmd.READ] * 6 + [Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, 99]),
        st.sampled_from([0, 0, 0, DF, FUA, DF | FUA, 0x8]),
        st.integers(0, 2**64 - 1), st.one_of(aligned, aligned, anything))
    return st.builds(
        lambda reqs, tail: b"".join(encode_request(f, int(c), h, o, min(n, 2**32 - 1))
                                    for c, f, h, (o, n) in reqs) + tail,
        st.lists(one, max_size=24), st.sampled_from([b"", b"\x25\x60\x95", b"\0" * 27]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("structured", [True, False])
@pytest.mark.parametrize("how", ["serve", "send"])
def test_answers_the_leading_run_as_python_does(device: BlockDevice, structured: bool, how: str,
                                                data: st.DataObject) -> None:
    neg = negotiated(device, structured, df=data.draw(st.booleans()))
    direct = device.direct_read()
    assert direct is not None
    stream = data.draw(requests(device.size, direct.align))
    limit = data.draw(st.sampled_from([1, 9000, fastpath.LIMIT]))
    with socketpair(data.draw(st.sampled_from([4096, 65536, 1 << 20]))) as (ours, peer):
        reader = fastpath.reader(device, neg, ours.fileno())
        assert reader is not None
        if how == "serve":
            pos, out = serve_all(reader, stream, limit)
        else:
            pos, out = sent_all(reader, stream, limit, peer)
    expected = python_replies(device, stream, neg)
    run = 0
    while run < len(expected) and taken(expected[run][0], device, neg):
        run += 1
    assert pos == run * REQUEST_SIZE
    assert out == b"".join(reply for _, reply in expected[:run])


@contextlib.contextmanager
def socketpair(sndbuf: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connection's socket as uvloop holds it (non-blocking), with a send
    buffer of about `sndbuf` bytes, and its peer."""
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        yield ours, peer


def test_plaintext_is_what_an_independent_decryption_gives(device: BlockDevice) -> None:
    plain = getattr(device, "plain", None)
    if plain is None:
        pytest.skip("a file: its bytes are served as they are")
    reader = fastpath.reader(device, negotiated(device, False))
    assert reader is not None
    rng = random.Random(7)
    offsets = [rng.randrange(device.size // 4096) * 4096 for _ in range(50)]
    stream = b"".join(encode_request(0, Cmd.READ, i, o, 4096) for i, o in enumerate(offsets))
    pos, out = serve_all(reader, stream, fastpath.LIMIT)
    assert pos == len(stream)
    for i, o in enumerate(offsets):
        reply = out[i * 4112 : (i + 1) * 4112]
        assert reply[8:16] == i.to_bytes(8, "big") and reply[16:] == plain[o : o + 4096]


def test_replies_are_cut_at_the_limit_and_go_on(tmp_path: Path) -> None:
    with FileDevice(settled(tmp_path / "f", os.urandom(1 << 20)), read_only=True) as dev:
        reader = fastpath.reader(dev, negotiated(dev, False))
        assert reader is not None
        stream = b"".join(encode_request(0, Cmd.READ, i, i * 4096, 4096) for i in range(40))
        end, replies, n, nbytes = reader.serve(stream, 0, 10 * 4112)
        assert (end, n, nbytes) == (10 * REQUEST_SIZE, 10, 40960) and len(replies or b"") == 41120
        end, replies, n, _ = reader.serve(stream, end, 1)  # one is always answered
        assert (end, n) == (11 * REQUEST_SIZE, 1)


def test_a_failed_read_is_left_to_python(tmp_path: Path) -> None:
    """The file shrinks under the server: the reads before the end are
    answered, the one past it is not consumed (Python reports its error)."""
    path = tmp_path / "f"
    with FileDevice(settled(path, os.urandom(1 << 20)), read_only=True) as dev:
        reader = fastpath.reader(dev, negotiated(dev, True))
        assert reader is not None
        os.truncate(path, 512 * 1024)
        stream = b"".join(encode_request(0, Cmd.READ, i, o, 4096)
                          for i, o in enumerate([0, 4096, 900 * 1024, 8192]))
        end, replies, n, _ = reader.serve(stream, 0, fastpath.LIMIT)
        assert (end, n) == (2 * REQUEST_SIZE, 2) and len(replies or b"") == 2 * (4096 + 28)
        assert reader.serve(stream, end, fastpath.LIMIT)[1:] == (None, 0, 0)


def test_a_closed_reader_answers_nothing(tmp_path: Path) -> None:
    with FileDevice(settled(tmp_path / "f", bytes(65536)), read_only=True) as dev:
        reader = fastpath.reader(dev, negotiated(dev, False))
        assert reader is not None
        stream = encode_request(0, Cmd.READ, 1, 0, 4096)
        assert reader.serve(stream, 0, fastpath.LIMIT)[2] == 1
        reader.close()
        assert reader.serve(stream, 0, fastpath.LIMIT) == (0, None, 0, 0)
        fresh = type(reader).__new__(type(reader))  # never initialised: no descriptor
        assert fresh.serve(stream, 0, fastpath.LIMIT) == (0, None, 0, 0)


def test_a_read_that_would_wait_for_the_disk_is_left_to_python(tmp_path: Path) -> None:
    """Out of the page cache, a read goes to the general path (a worker
    thread), never blocking the event loop; once cached, the fast path takes it."""
    path = settled(tmp_path / "f", os.urandom(4 << 20))
    with FileDevice(path, read_only=True) as dev:
        reader = fastpath.reader(dev, negotiated(dev, False))
        assert reader is not None
        stream = encode_request(0, Cmd.READ, 1, 1 << 20, 256 * 1024)
        evict(dev.fd, 1 << 20)
        assert reader.serve(stream, 0, fastpath.LIMIT) == (0, None, 0, 0)
        dev.pread_into(memoryview(bytearray(256 * 1024)), 1 << 20)
        end, replies, n, _ = reader.serve(stream, 0, fastpath.LIMIT)
        assert (end, n) == (REQUEST_SIZE, 1)
        assert replies is not None and replies[16:] == Path(path).read_bytes()[1 << 20:][:1 << 18]


def nowait_unsupported(directory: str) -> bool:
    """Whether the file system at `directory` refuses RWF_NOWAIT (tmpfs does)."""
    path = Path(directory) / f"nbdluks-nowait-{os.getpid()}"
    try:
        path.write_bytes(bytes(4096))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        finally:
            os.close(fd)
    except OSError as e:
        return e.errno == errno.EOPNOTSUPP
    finally:
        path.unlink(missing_ok=True)
    return False


@pytest.mark.skipif(not nowait_unsupported("/dev/shm"), reason="no file system refusing RWF_NOWAIT")
def test_where_the_kernel_cannot_tell_only_short_reads_are_taken() -> None:
    """On a file system without RWF_NOWAIT a read may wait for the disk:
    only reads the device calls quick (inline_max) are taken."""
    path = Path("/dev/shm") / f"nbdluks-fast-{os.getpid()}"
    try:
        with FileDevice(settled(path, os.urandom(1 << 20)), read_only=True) as dev:
            reader = fastpath.reader(dev, negotiated(dev, False))
            assert reader is not None
            big = encode_request(0, Cmd.READ, 1, 0, 256 * 1024)
            short = encode_request(0, Cmd.READ, 2, 8192, dev.inline_max)
            assert reader.serve(big, 0, fastpath.LIMIT)[1:] == (None, 0, 0)  # learns it here
            assert reader.serve(big, 0, fastpath.LIMIT)[1:] == (None, 0, 0)
            end, replies, n, _ = reader.serve(short, 0, fastpath.LIMIT)
            assert (end, n) == (REQUEST_SIZE, 1)
            assert replies is not None and replies[16:] == path.read_bytes()[8192:][:dev.inline_max]
    finally:
        path.unlink(missing_ok=True)


def test_long_replies_are_spliced_and_what_the_socket_refuses_comes_back(tmp_path: Path) -> None:
    """1 MiB reads sent on a socket with a small buffer: each call writes
    what the socket takes and hands back the rest of that reply; the bytes
    arrive whole and in order. Out of the page cache, a read is not taken."""
    content = os.urandom(8 << 20)
    with FileDevice(settled(tmp_path / "f", content), read_only=True) as dev, \
            socketpair(65536) as (ours, peer):
        reader = fastpath.reader(dev, negotiated(dev, False), ours.fileno())
        assert reader is not None
        offsets = [(i * 3 % 8) << 20 for i in range(8)]
        stream = b"".join(encode_request(0, Cmd.READ, i, o, 1 << 20)
                          for i, o in enumerate(offsets))
        pos, out = sent_all(reader, stream, fastpath.LIMIT, peer)
        assert pos == len(stream)
        expected = b"".join(encode_simple(i) + content[o : o + (1 << 20)]
                            for i, o in enumerate(offsets))
        assert out == expected
        evict(dev.fd, offsets[0])
        assert reader.send(stream, 0, fastpath.LIMIT) == (0, None, 0, 0)
        assert drain(peer) == b""


def evict(fd: int, offset: int) -> None:
    """Drop the file's clean pages from the page cache, until the kernel
    says the page at `offset` would wait for the disk (a page still
    locked by readahead or reclaim can survive one fadvise)."""
    for _ in range(50):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(1)], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return
        time.sleep(0.01)
    raise AssertionError("the page cache kept the range")


def encode_simple(handle: int) -> bytes:
    return (0x67446698).to_bytes(4, "big") + bytes(4) + handle.to_bytes(8, "big")


def test_holes_are_left_to_python_which_skips_them(tmp_path: Path) -> None:
    """A sparse file: a long structured read (no DF) over data is answered
    here; one over a hole goes through the device, whose reply skips it."""
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
    with FileDevice(settled(path), read_only=True) as dev:
        neg = negotiated(dev, True, df=False)
        reader = fastpath.reader(dev, neg)
        assert reader is not None
        data_read = encode_request(0, Cmd.READ, 1, 1 << 20, 256 * 1024)
        hole_read = encode_request(0, Cmd.READ, 2, (2 << 20) - 4096, 256 * 1024)
        end, replies, n, _ = reader.serve(data_read + hole_read, 0, 1 << 20)
        assert (end, n) == (REQUEST_SIZE, 1)
        assert replies == python_replies(dev, data_read, neg)[0][1]
        assert reader.serve(hole_read, 0, 1 << 20)[1:] == (None, 0, 0)
        assert any(e.hole for e in dev.extents((2 << 20) - 4096, 256 * 1024))
