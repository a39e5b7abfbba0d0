"""/metrics and /healthz: the exposition format, exact counts across worker
processes after a known workload, health that follows the upstream."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from nbdluks.daemon.metrics import Monitor, respond
from nbdluks.nbd.constants import Cmd, Errno
from nbdluks.nbd.stats import StatsTable
from tests.conftest import SYSTEM_PYTHON, free_port, need, run, wait_listening
from tests.luks.reference import luks_format

MiB = 1 << 20

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample, by name and labels; the parser rejects malformed text."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# --- the responder, without I/O ----------------------------------------------------


def test_exposition_parses_and_counts_what_was_recorded() -> None:
    table = StatsTable(2)
    a, b = table.slot(0), table.slot(1)
    a.request(Cmd.READ, 0, 300_000, 4096)
    b.request(Cmd.READ, Errno.EIO, 20_000_000)
    a.flush()
    b.flush()
    b.opened()
    b.upstream(True)
    text = respond(Monitor(table, 0.25, "payload"), b"GET /metrics HTTP/1.1\r\n\r\n", True)
    head, _, body = text.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    s = parse(body.decode())
    assert sample(s, "nbdluks_requests_total", command="read") == 2
    assert sample(s, "nbdluks_requests_total", command="write") == 0
    assert sample(s, "nbdluks_request_errors_total", command="read", errno="EIO") == 1
    assert sample(s, "nbdluks_bytes_total", direction="read") == 4096
    assert sample(s, "nbdluks_request_duration_seconds_bucket", command="read",
                  le="0.0005") == 1
    assert sample(s, "nbdluks_request_duration_seconds_bucket", command="read",
                  le="0.025") == 2
    assert sample(s, "nbdluks_request_duration_seconds_count", command="read") == 2
    assert sample(s, "nbdluks_request_duration_seconds_sum", command="read") == \
        pytest.approx(0.0203)
    assert sample(s, "nbdluks_connections_active") == 1
    assert sample(s, "nbdluks_upstream_up", source="payload") == 1
    assert sample(s, "nbdluks_unlock_seconds") == 0.25


def test_health_follows_serving_and_upstream() -> None:
    table = StatsTable()
    mon = Monitor(table, None, "payload")
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    assert respond(mon, get, True).startswith(b"HTTP/1.1 200 OK")
    table.slot(0).upstream(False)
    down = respond(mon, get, True)
    assert down.startswith(b"HTTP/1.1 503") and down.endswith(b"upstream payload down\n")
    table.slot(0).upstream(True)
    assert respond(mon, get, False).endswith(b"stopping\n")
    # without an NBD source there is no upstream row
    assert b"upstream_up" not in respond(Monitor(table), b"GET /metrics HTTP/1.0\r\n\r\n", True)


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /nope HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"\xff\xfe garbage\r\n\r\n", b"400"),
    (b"GET\r\n\r\n", b"400"),
])
def test_bad_requests(head: bytes, status: bytes) -> None:
    assert respond(Monitor(StatsTable()), head, True).startswith(b"HTTP/1.1 " + status)


def test_head_has_no_body() -> None:
    out = respond(Monitor(StatsTable()), b"HEAD /metrics HTTP/1.1\r\n\r\n", True)
    assert out.endswith(b"\r\n\r\n") and b"Content-Length: " in out


# --- a real server ---------------------------------------------------------------

# Per connection: 16 reads of 64 KiB, a 4 KiB write, a flush, a read past the
# end (EINVAL), then a clean disconnect.
WORKLOAD = r"""
import nbd, sys
uri, rounds = sys.argv[1], int(sys.argv[2])
for r in range(rounds):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(uri)
    for i in range(16):
        h.pread(65536, i * 65536)
    h.pwrite(bytes([r + 1]) * 4096, 4096 * r)
    h.flush()
    try:
        h.pread(4096, h.get_size())
    except nbd.Error as e:
        assert e.errnum == 22, e
    h.shutdown()
print("ok")
"""


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def processes_of(log: str) -> int:
    for line in log.splitlines():
        rec = json.loads(line)
        if rec.get("event") == "listening":
            return int(rec["processes"])
    raise AssertionError("no listening line")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_counts_are_exact_across_processes(nbdluks, tmp_path: Path, processes: str) -> None:
    need("cryptsetup", "nbdcopy", SYSTEM_PYTHON)
    made = luks_format(tmp_path, detached=True, size=8 * MiB)
    assert made.header
    port = free_port()
    srv = nbdluks("--payload", str(made.payload), "--header", str(made.header),
                  "--passphrase-file", str(tmp_path / "vol.pass"), "--processes", processes,
                  "--metrics", str(port))
    rounds = 6
    out = run([SYSTEM_PYTHON, "-c", WORKLOAD, srv.uri, str(rounds)]).stdout
    assert out.strip() == "ok"

    def settled() -> bool:  # every connection's close is counted
        return sample(parse(scrape(port)[1]), "nbdluks_connections_active") == 0

    wait_for(settled, "the connections to close")
    status, text = scrape(port)
    assert status == 200
    s = parse(text)
    # exactly what the workload sent
    assert sample(s, "nbdluks_requests_total", command="read") == rounds * 17
    assert sample(s, "nbdluks_requests_total", command="write") == rounds
    assert sample(s, "nbdluks_requests_total", command="flush") == rounds
    assert sample(s, "nbdluks_request_errors_total", command="read", errno="EINVAL") == rounds
    assert sample(s, "nbdluks_request_duration_seconds_count", command="read") == rounds * 17
    assert sample(s, "nbdluks_bytes_total", direction="read") == rounds * 16 * 65536
    assert sample(s, "nbdluks_bytes_total", direction="write") == rounds * 4096
    # (+1: the fixture's check that the server listens connected once)
    assert sample(s, "nbdluks_connections_total") == rounds + 1

    for _ in range(3):  # 3 full copies of the 8 MiB export
        run(["nbdcopy", srv.uri, "null:"])
    wait_for(settled, "the copies' connections to close")
    s = parse(scrape(port)[1])
    assert sample(s, "nbdluks_bytes_total", direction="read") >= \
        rounds * 16 * 65536 + 3 * 8 * MiB
    assert sample(s, "nbdluks_connections_total") >= rounds + 3
    assert 0 < sample(s, "nbdluks_unlock_seconds") < 60
    assert ("nbdluks_upstream_up", frozenset({("source", "payload")})) not in s
    assert processes_of(srv.log_text()) == int(processes)
    if processes == "2":  # both workers served some of it
        assert {json.loads(x).get("worker") for x in srv.log_text().splitlines()
                if '"connection closed"' in x} >= {0, 1}
    assert scrape(port, "/healthz") == (200, "ok\n")
    assert srv.stop() == 0


def nbdkit_on(port: int, path: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
                                 "-p", str(port), "file", f"file={path}"],
                                stdout=f, stderr=subprocess.STDOUT)
    wait_listening(proc, None, port, log)
    return proc


def test_healthz_follows_the_upstream(nbdluks, tmp_path: Path) -> None:
    need("cryptsetup", "nbdkit")
    made = luks_format(tmp_path, detached=True, size=8 * MiB)
    assert made.header
    up_port, port = free_port(), free_port()
    upstream = nbdkit_on(up_port, made.payload, tmp_path / "nbdkit.log")
    try:
        srv = nbdluks("--payload", f"nbd://127.0.0.1:{up_port}/", "--header", str(made.header),
                      "--passphrase-file", str(tmp_path / "vol.pass"), "--processes", "2",
                      "--upstream-reconnect", "30", "--metrics", f"127.0.0.1:{port}")
        n = processes_of(srv.log_text())
        wait_for(lambda: scrape(port, "/healthz")[0] == 200, "healthy")
        assert sample(parse(scrape(port)[1]), "nbdluks_upstream_up", source="payload") == 1

        upstream.send_signal(signal.SIGKILL)
        upstream.wait()
        wait_for(lambda: scrape(port, "/healthz") == (503, "upstream payload down\n"),
                 "503 with the upstream gone")
        assert sample(parse(scrape(port)[1]), "nbdluks_upstream_up", source="payload") == 0

        upstream = nbdkit_on(up_port, made.payload, tmp_path / "nbdkit.log")
        wait_for(lambda: scrape(port, "/healthz")[0] == 200, "healthy again")
        s = parse(scrape(port)[1])
        assert sample(s, "nbdluks_upstream_up", source="payload") == 1
        # each process had its own upstream connection, and made it again once
        assert sample(s, "nbdluks_upstream_reconnects_total", source="payload") == n
        run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 64k", srv.uri])
        assert srv.stop() == 0
    finally:
        upstream.kill()
        upstream.wait()


HOLDER = r"""
import nbd, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(5):
    h.pread(4096, i * 4096)
print("done", flush=True)
time.sleep(30)
"""


def test_counts_of_open_connections_show_within_a_second(nbdluks, tmp_path: Path) -> None:
    need(SYSTEM_PYTHON)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(MiB))
    port = free_port()
    srv = nbdluks("--raw", str(disk), "--processes", "1", "--metrics", str(port))
    holder = subprocess.Popen([SYSTEM_PYTHON, "-c", HOLDER, srv.uri], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "done"
        # the connection stays open: the periodic flush publishes its reads
        wait_for(lambda: sample(parse(scrape(port)[1]), "nbdluks_requests_total",
                                command="read") == 5, "the reads to show", timeout=5)
        assert sample(parse(scrape(port)[1]), "nbdluks_connections_active") == 1
    finally:
        holder.kill()
        holder.wait()
    assert srv.stop() == 0


def test_a_flood_of_idle_http_connections_never_starves_healthz(nbdluks, tmp_path: Path
                                                                  ) -> None:
    import socket

    from nbdluks.daemon.metrics import MAX_HTTP

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(MiB))
    port = free_port()
    srv = nbdluks("--raw", str(disk), "--processes", "1", "--metrics", str(port))
    wait_listening(srv.proc, None, port, srv.log)  # the NBD socket may listen first
    flood = 70
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(flood)]
    try:
        # each new one evicts the oldest that has not asked: the first ones
        # are closed at once (not after the 5 s a request head may take)
        closed = 0
        for s in idle[: flood - MAX_HTTP]:
            s.settimeout(4)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass  # still open: counted as not closed
        assert closed == flood - MAX_HTTP
        # the newest MAX_HTTP are still open and idle: a probe still gets in
        for _ in range(5):
            assert scrape(port, "/healthz")[0] == 200
    finally:
        for s in idle:
            s.close()
    assert srv.stop() == 0


@settings(max_examples=500, deadline=None)
@given(head=st.one_of(
    st.binary(max_size=600),
    st.builds(lambda m, t, v: f"{m} {t} {v}\r\n\r\n".encode(),
              st.sampled_from(["GET", "HEAD", "POST", "", "G\x00T"]),
              st.text(max_size=40), st.sampled_from(["HTTP/1.1", "HTTP/1.0", "", "x y"]))),
    serving=st.booleans())
def test_any_request_head_gets_an_http_answer(head: bytes, serving: bool) -> None:
    """The sans-IO responder: whatever the head, a well-formed response."""
    out = respond(Monitor(StatsTable(1)), head, serving)
    status_line, _, rest = out.partition(b"\r\n")
    assert status_line.split(b" ")[0] == b"HTTP/1.1"
    assert int(status_line.split(b" ")[1]) in (200, 400, 404, 405, 503)
    headers, _, body = rest.partition(b"\r\n\r\n")
    length = int(next(h for h in headers.split(b"\r\n") if h.startswith(b"Content-Length:"))
                 .split(b":")[1])
    assert len(body) in (0, length)  # HEAD: no body
