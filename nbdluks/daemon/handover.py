"""Volumes handed to running workers, one by one, over the hand-off channel.

The parent unlocks; a worker that is already serving gets each volume as it
becomes ready (tag b"v"): the opened volume pickled (its device stack
rebuilt from the same arguments as `reopen`), its descriptors beside it
(SCM_RIGHTS, block.Passed) and its keys out of band (pickle buffers), on a
socketpair of its own passed with the tag. Key bytes never sit in an
immutable object on either end: they go from the parent's device to the
socket and from the socket into buffers the receiver wipes once the device
has its own copy. A change (tag b"r": JSON) announces exports still being
unlocked (clients wait for them), removes exports and marks failed ones.
The worker applies them in the order sent.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import io
import json
import pickle
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..block import BlockDevice, Passed
from ..nbd import Export, NbdServer
from ..unlock import OpenVolume

log = structlog.get_logger("nbdluks")

VOLUME, CHANGE = b"v", b"r"
# meta (JSON) length, pickle length, number of out-of-band buffers
_HEAD = struct.Struct("<III")
_MAX_FDS = 32
_TIMEOUT = 10.0  # a worker that reads none of this for so long is stuck


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, fds: list[int], buffers: list[pickle.PickleBuffer]
                 ) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffers.append)
        self.fds = fds

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, Passed):
            self.fds.append(obj.fd)
            return len(self.fds) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytearray, fds: list[int], buffers: list[bytearray]) -> None:
        super().__init__(io.BytesIO(data), buffers=buffers)
        self.fds = fds

    def persistent_load(self, pid: Any) -> int:
        return self.fds[int(pid)]


def send_volume(handoff: socket.socket, volume: OpenVolume, meta: dict[str, Any]) -> None:
    """Hand `volume` (opened in this process) to the worker at `handoff`."""
    fds: list[int] = []
    buffers: list[pickle.PickleBuffer] = []
    f = io.BytesIO()
    _Pickler(f, fds, buffers).dump(volume)
    raws = [b.raw() for b in buffers]
    head = json.dumps(meta).encode()
    msg = bytearray(_HEAD.pack(len(head), f.getbuffer().nbytes, len(raws)))
    for raw in raws:
        msg += struct.pack("<I", raw.nbytes)
    msg += head
    msg += f.getbuffer()
    try:
        for raw in raws:
            msg += raw
        _send(handoff, VOLUME, msg, fds)
    finally:
        wipe(msg)


def send_change(handoff: socket.socket, change: dict[str, Any]) -> None:
    _send(handoff, CHANGE, bytearray(json.dumps(change).encode()), [])


def _send(handoff: socket.socket, tag: bytes, msg: bytearray, fds: list[int]) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        socket.send_fds(handoff, [tag], [theirs.fileno()])
        theirs.close()
        ours.settimeout(_TIMEOUT)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = ours.sendmsg([msg], rights)
        if sent < len(msg):
            ours.sendall(memoryview(msg)[sent:])


def _fill(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("the hand-over ended early")
        view = view[n:]


Received = tuple[OpenVolume, BlockDevice]


def receive_volume(sock: socket.socket) -> tuple[dict[str, Any], Received | Exception]:
    """The meta and the volume `send_volume` sent, with the device this
    process serves (sealed), or why it could not be rebuilt here; blocking,
    for a thread."""
    return receive(sock, serve=True)  # type: ignore[return-value]


def receive(sock: socket.socket, *, serve: bool = False
            ) -> tuple[dict[str, Any], Received | OpenVolume | Exception]:
    """As receive_volume; without `serve`, the volume alone, its template
    keeping its keys (for the process that rotates them)."""
    return load(read(sock), serve=serve)


@dataclass
class Message:
    """A volume handed over, read but not rebuilt yet (rebuilding may start
    a thread: an NBD source connects)."""

    meta: dict[str, Any]
    data: bytearray
    fds: list[int]
    buffers: list[bytearray]

    def discard(self) -> None:
        """Its descriptors closed and its bytes (keys) wiped, in this process."""
        _close(self.fds)
        self.wipe()

    def wipe(self) -> None:
        for buf in self.buffers:
            wipe(buf)
        wipe(self.data)


def read(sock: socket.socket) -> Message:
    """The next volume handed over on `sock`, not rebuilt (see `load`)."""
    sock.setblocking(True)
    sock.settimeout(_TIMEOUT)
    head = bytearray(_HEAD.size)
    n, anc, _, _ = sock.recvmsg_into([head], socket.CMSG_SPACE(_MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, passed in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", passed[: len(passed) - len(passed) % 4])
    buffers: list[bytearray] = []
    try:
        if n == 0:
            raise ConnectionError("the hand-over ended early")
        _fill(sock, memoryview(head)[n:])
        meta_len, pickle_len, nbuf = _HEAD.unpack(head)
        lens = bytearray(4 * nbuf)
        _fill(sock, memoryview(lens))
        meta, data = bytearray(meta_len), bytearray(pickle_len)
        _fill(sock, memoryview(meta))
        _fill(sock, memoryview(data))
        buffers = [bytearray(k) for (k,) in struct.iter_unpack("<I", lens)]
        for buf in buffers:
            _fill(sock, memoryview(buf))
    except BaseException:
        _close(fds)
        for buf in buffers:
            wipe(buf)
        raise
    return Message(json.loads(meta), data, fds, buffers)


def load(message: Message, *, serve: bool = False
         ) -> tuple[dict[str, Any], Received | OpenVolume | Exception]:
    """The volume rebuilt in this process (as `receive`); its bytes wiped."""
    try:
        volume = _Unpickler(message.data, message.fds, message.buffers).load()
        if not isinstance(volume, OpenVolume):
            raise TypeError(f"not a volume: {type(volume).__name__}")
        if not serve:
            return message.meta, volume
        device = volume.device()
    except Exception as e:  # this worker cannot serve it (an upstream refused?)
        _close(message.fds)
        return message.meta, e
    finally:
        message.wipe()  # the devices copied their keys
    return message.meta, (volume, device)


def wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            socket.close(fd)


def read_change(sock: socket.socket) -> dict[str, Any]:
    sock.setblocking(True)
    sock.settimeout(_TIMEOUT)
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    change = json.loads(data)
    assert isinstance(change, dict)
    return change


class Receiver:
    """A worker's end: the parent's messages applied to its server, in the
    order sent. `counts(served, failed)`: the exports of the whole server."""

    def __init__(self, server: NbdServer, rows: dict[str, int],
                 counts: Callable[[int, int], object]) -> None:
        self.server = server
        self.rows = rows  # the stats table's rows, by export name
        self.counts = counts
        self._queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self._task = server.loop.create_task(self._run())

    def handlers(self) -> dict[bytes, Callable[[socket.socket], object]]:
        return {VOLUME: self._volume, CHANGE: self._change}

    def _volume(self, sock: socket.socket) -> None:
        self._queue.put_nowait((VOLUME, sock))

    def _change(self, sock: socket.socket) -> None:
        """Read at once (it is small and written already): the exports it
        announces are waited for by the next connections already."""
        try:
            change = read_change(sock)
        except (OSError, ValueError, AssertionError) as e:
            log.error("change from the parent unreadable", error=str(e))
            return
        finally:
            sock.close()
        if "order" in change:
            self.server.exports.order(change["order"])
        self.server.exports.expect(change.get("pending", []))
        self._queue.put_nowait((CHANGE, change))

    async def _run(self) -> None:
        while True:
            kind, item = await self._queue.get()
            try:
                if kind == VOLUME:
                    await self._add(item)
                else:
                    self._apply(item)
            except Exception as e:  # a bug: the next message still counts
                log.error("message from the parent not applied", error=str(e),
                          kind=type(e).__name__)

    async def _add(self, sock: socket.socket) -> None:
        try:
            # on the I/O threads the worker has anyway (a thread of its own
            # would cost a malloc arena per worker)
            meta, got = await self.server.dispatcher.call(functools.partial(receive_volume, sock))
        finally:
            sock.close()
        name = str(meta["name"])
        if isinstance(got, Exception):
            log.error("export not served by this worker", export=name, error=str(got),
                      kind=type(got).__name__)
            self.server.remove_export(name, failed=True)
            return
        volume, device = got
        if meta.get("row") is not None:
            self.rows[name] = int(meta["row"])
        device.watch(self.server.shared.stats.upstream)
        self.server.add_export(Export(name, device, volume.config.description))
        self.counts(meta["served"], meta["failed_count"])

    def _apply(self, change: dict[str, Any]) -> None:
        for name in change.get("remove", []):
            self.server.remove_export(name)
        for name in change.get("failed", []):
            self.server.remove_export(name, failed=True)
        if "served" in change:
            self.counts(change["served"], change["failed_count"])
