"""Prometheus metrics and a health check over HTTP: GET /metrics, GET /healthz.

Every server process counts in its own slot of a StatsTable (nbd/stats.py);
whichever process answers adds up all the slots, so the figures are exact
for the whole server. With worker processes, the parent hands each HTTP
connection to a worker as it does NBD connections (serving.py): one small
asyncio responder serves both layouts. `respond` is the sans-IO part.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import __version__
from ..nbd import COMMANDS, Totals, stats

# A request head larger than this, or slower than this, is dropped.
_MAX_HEAD = 8192
_TIMEOUT = 5.0
# HTTP connections a process answers at once (a flood of idle connections
# must not cost the NBD clients file descriptors); past it, a new connection
# evicts the oldest that has not sent its request yet, so that a probe always
# gets in (it asks at once), and is closed itself only when every one has.
MAX_HTTP = 32
_SERVED = [c for c in COMMANDS if c != "DISC"]  # DISC is not a request with a reply


@dataclass(frozen=True)
class Monitor:
    table: stats.StatsTable
    unlock_seconds: float | None = None
    upstream: str | None = None  # the role of the NBD source watched ("payload")
    exports: int = 1  # served
    failed: int = 0  # configured, but could not be opened or unlocked
    rotation: Callable[[], tuple[int, int]] | None = None  # bytes reencrypted, of all

    def health(self, serving: bool) -> tuple[bool, str]:
        if not serving:
            return False, "stopping"
        if self.upstream is not None and self.table.totals().upstream == stats.UPSTREAM_DOWN:
            return False, f"upstream {self.upstream} down"
        return True, "ok"

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        t = self.table.totals()
        out = _Text()
        out.family("build_info", "gauge", "nbdluks version", [({"version": __version__}, 1)])
        out.family("requests_total", "counter", "requests answered, by command",
                   [({"command": c.lower()}, t.requests(COMMANDS.index(c))) for c in _SERVED])
        out.family("request_errors_total", "counter", "requests answered with an error",
                   [({"command": c.lower(), "errno": e.name}, n)
                    for c in _SERVED for e, n in t.errors(COMMANDS.index(c))])
        out.family("bytes_total", "counter", "data bytes read and written by clients",
                   [({"direction": "read"}, t[stats.BYTES_READ]),
                    ({"direction": "write"}, t[stats.BYTES_WRITTEN])])
        out.histogram(t)
        out.family("connections_active", "gauge", "client connections open",
                   [({}, t[stats.CONNECTIONS])])
        out.family("connections_total", "counter", "client connections accepted",
                   [({}, t[stats.CONNECTIONS_TOTAL])])
        out.family("connections_refused_total", "counter",
                   "connections refused because every slot was busy", [({}, t[stats.REFUSED])])
        out.family("connections_evicted_total", "counter",
                   "idle or negotiating connections closed to make room",
                   [({}, t[stats.EVICTED])])
        out.family("busy_poll_seconds_total", "counter",
                   "time spent awaiting requests on the CPU (busy polling)",
                   [({}, t[stats.POLLED_NS] / 1e9)])
        out.family("busy_polls_total", "counter", "busy polls, by whether a request came",
                   [({"found": "yes"}, t[stats.POLL_HITS]),
                    ({"found": "no"}, t[stats.POLL_MISSES])])
        if self.upstream is not None:
            up = t.upstream
            out.family("upstream_up", "gauge", "1 while the NBD source is connected",
                       [({"source": self.upstream}, int(up != stats.UPSTREAM_DOWN))])
            out.family("upstream_reconnects_total", "counter",
                       "connections to the NBD source made again after one was lost",
                       [({"source": self.upstream}, t[stats.RECONNECTS])])
        per = sorted(t.exports.items())
        out.family("export_requests_total", "counter", "requests answered, by export",
                   [({"export": name}, c[stats.EXPORT_REQUESTS]) for name, c in per])
        out.family("export_request_errors_total", "counter",
                   "requests answered with an error, by export",
                   [({"export": name}, c[stats.EXPORT_ERRORS]) for name, c in per])
        out.family("export_bytes_total", "counter", "data bytes read and written, by export",
                   [({"export": name, "direction": d}, c[cell]) for name, c in per
                    for d, cell in (("read", stats.EXPORT_READ),
                                    ("write", stats.EXPORT_WRITTEN))])
        out.family("exports", "gauge", "exports served", [({}, self.exports)])
        out.family("exports_failed", "gauge",
                   "exports configured but not served (could not be opened or unlocked)",
                   [({}, self.failed)])
        if self.rotation is not None:
            done, total = self.rotation()
            out.family("reencryption_bytes_done", "gauge",
                       "bytes under the new volume key (the rate: rate() of it)", [({}, done)])
            out.family("reencryption_bytes_total", "gauge", "bytes to reencrypt in all",
                       [({}, total)])
        if self.unlock_seconds is not None:
            out.family("unlock_seconds", "gauge", "seconds the key slot took to open",
                       [({}, round(self.unlock_seconds, 6))])
        return out.text()


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: list[tuple[dict[str, str], float]]) -> None:
        name = "nbdluks_" + name
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {value}" for labels, value in samples]

    def histogram(self, t: Totals) -> None:
        name = "nbdluks_request_duration_seconds"
        self.lines += [f"# HELP {name} time from a request's start to its reply, by command",
                       f"# TYPE {name} histogram"]
        for c in _SERVED:
            counts, sum_ns = t.latency(COMMANDS.index(c))
            cmd = c.lower()
            for le, n in zip([*map(repr, stats.BUCKETS), "+Inf"], counts, strict=True):
                self.lines.append(f'{name}_bucket{{command="{cmd}",le="{le}"}} {n}')
            self.lines.append(f'{name}_sum{{command="{cmd}"}} {sum_ns / 1e9}')
            self.lines.append(f'{name}_count{{command="{cmd}"}} {counts[-1]}')

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
           for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def respond(monitor: Monitor, head: bytes, serving: bool) -> bytes:
    """The whole HTTP response to a request head."""
    try:
        method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        return _response(400, "bad request\n")
    if method not in ("GET", "HEAD"):
        return _response(405, "only GET\n", extra="Allow: GET, HEAD\r\n")
    path = target.split("?", 1)[0]
    if path == "/metrics":
        body = monitor.render()
        status = 200
        ctype = "text/plain; version=0.0.4; charset=utf-8"
    elif path == "/healthz":
        ok, why = monitor.health(serving)
        status, body, ctype = (200 if ok else 503), why + "\n", "text/plain; charset=utf-8"
    else:
        return _response(404, "try /metrics or /healthz\n")
    return _response(status, body, ctype, head_only=method == "HEAD")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}


def _response(status: int, body: str, ctype: str = "text/plain; charset=utf-8",
              extra: str = "", head_only: bool = False) -> bytes:
    data = body.encode()
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(data)}\r\n{extra}Connection: close\r\n\r\n").encode()
    return head if head_only else head + data


@dataclass(frozen=True)
class Observed:
    """What the processes count into, and who answers /metrics and /healthz."""

    table: stats.StatsTable
    monitor: Monitor | None = None
    http: list[socket.socket] = field(default_factory=list)  # listening for HTTP


# --- the asyncio adapter ------------------------------------------------------


class Responder:
    """One process's HTTP side: at most MAX_HTTP connections answered at
    once (see MAX_HTTP), each with _TIMEOUT to ask and to read."""

    def __init__(self, monitor: Monitor, serving: Callable[[], bool]) -> None:
        self.monitor = monitor
        self.serving = serving
        self.open = 0
        # Connections that have not sent their request head, oldest first.
        self.waiting: dict[asyncio.StreamWriter, None] = {}

    async def listen(self, sock: socket.socket) -> asyncio.Server:
        """Answer on a listening socket."""
        return await asyncio.start_server(self._answer, sock=sock, limit=_MAX_HEAD)

    async def answer_accepted(self, sock: socket.socket) -> None:
        """Answer a connection another process accepted."""
        try:
            reader, writer = await asyncio.open_connection(sock=sock, limit=_MAX_HEAD)
        except OSError:
            sock.close()
            return
        await self._answer(reader, writer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        if self.open >= MAX_HTTP:
            if not self.waiting:
                writer.transport.abort()
                return
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            oldest.transport.abort()  # its handler ends and counts itself out
        self.open += 1
        self.waiting[writer] = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            self.waiting.pop(writer, None)
            writer.write(respond(self.monitor, head, self.serving()))
            await asyncio.wait_for(writer.drain(), _TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass  # a client that went away, or never asked
        finally:
            self.waiting.pop(writer, None)
            self.open -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
