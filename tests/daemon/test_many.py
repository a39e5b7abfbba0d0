"""Many volumes in one server (`serve --config`): 200 volumes made by
cryptsetup (LUKS1 attached, LUKS2 detached, several KDFs, each its own
passphrase), a raw file, an nbdkit export and a Tang-bound volume, listed
and read byte-exact;
one wrong key leaves the rest served; SIGHUP adds and removes exports while a
client reads an unchanged one without an error."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    SYSTEM_PYTHON,
    Served,
    Upstream,
    free_port,
    log_events,
    need,
    pattern,
)
from tests.luks.reference import Made, fill, luks_format
from tests.unlock.test_tokens import TANGD, Tang, bind
from tests.unlock.test_tokens import volume as tang_volume

MiB = 1 << 20
pytestmark = pytest.mark.slow

# Reads the first and last MiB of each export named on the command line:
# one JSON line per export, {name: [sha256 first, sha256 last, size]}.
READER = r"""
import hashlib, json, nbd, sys
sock = sys.argv[1]
for name in sys.argv[2:]:
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    size = h.get_size()
    first = h.pread(min(size, 1 << 20), 0)
    last = h.pread(min(size, 1 << 20), max(0, size - (1 << 20)))
    h.shutdown()
    print(json.dumps({name: [hashlib.sha256(first).hexdigest(),
                             hashlib.sha256(last).hexdigest(), size]}), flush=True)
"""


# Reads export argv[2] in a loop until the file argv[3] exists; prints the
# number of reads and errors.
LOOP = r"""
import nbd, os, sys
h = nbd.NBD()
h.set_export_name(sys.argv[2])
h.connect_unix(sys.argv[1])
print("connected", flush=True)
reads = errors = 0
while not os.path.exists(sys.argv[3]):
    try:
        h.pread(65536, (reads * 65536) % (1 << 20))
        reads += 1
    except nbd.Error as e:
        errors += 1
        print("error", e, flush=True)
        break
print("reads", reads, "errors", errors, flush=True)
"""


def kind(i: int) -> dict[str, object]:
    """Volume i: LUKS1 attached, LUKS2 detached with PBKDF2, Argon2id, Argon2i."""
    return [dict(version=1), dict(version=2, detached=True),
            dict(version=2, detached=True, pbkdf="argon2id"),
            dict(version=2, pbkdf="argon2i", size=20 * MiB)][i % 4]


def make(tmp: Path, i: int) -> tuple[Made, bytes]:
    opts: dict[str, object] = {"size": 4 * MiB, **kind(i)}
    made = luks_format(tmp, name=f"v{i}", passphrase=f"passphrase {i}".encode(),
                       **opts)  # type: ignore[arg-type]
    size = (made.payload.stat().st_size - made.offset) // made.sector_size * made.sector_size
    plain = pattern(size, seed=i + 1)
    fill(made, plain)
    return made, plain


def table(name: str, made: Made, passfile: Path) -> str:
    lines = [f'[exports."{name}"]', f'payload = "{made.payload}"',
             f'key-file = "{passfile}"', f'description = "volume {name}"']
    if made.header:
        lines.append(f'header = "{made.header}"')
    return "\n".join(lines) + "\n"


def digests(plain: bytes) -> list[object]:
    n = min(len(plain), MiB)
    return [hashlib.sha256(plain[:n]).hexdigest(), hashlib.sha256(plain[-n:]).hexdigest(),
            len(plain)]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Made, bytes]]]:
    need("cryptsetup", "nbdkit", "nbdinfo")
    tmp = tmp_path_factory.mktemp("many")
    with ThreadPoolExecutor(4) as pool:
        yield list(pool.map(lambda i: make(tmp, i), range(200)))


def read(served: Served, names: list[str]) -> dict[str, list[object]]:
    out = subprocess.run([SYSTEM_PYTHON, "-c", READER, str(served.socket), *names],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    got: dict[str, list[object]] = {}
    for line in out.splitlines():
        got.update(json.loads(line))
    return got


def listed(served: Served) -> list[list[str]]:
    """(name, description) of each export NBD_OPT_LIST lists, in order."""
    out = subprocess.run(["nbdinfo", "--list", "--json", served.uri], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return [[e["export-name"], e.get("description", "")] for e in json.loads(out)["exports"]]


def write_config(tmp: Path, made: list[tuple[Made, bytes]], indexes: range | list[int],
                 extra: str = "") -> Path:
    parts = []
    for i in indexes:
        m = made[i][0]
        parts.append(table(f"v{i}", m, m.payload.parent / f"v{i}.pass"))
    path = tmp / "exports.toml"
    path.write_text("[server]\nprocesses = 2\n\n" + "".join(parts) + extra)
    return path


def test_two_hundred_volumes(nbdluks: Callable[..., Served], volumes, tmp_path: Path,
                             upstreams) -> None:
    made = volumes
    raw = tmp_path / "raw.img"
    raw.write_bytes(pattern(2 * MiB, seed=999))
    up_file = tmp_path / "up.img"
    up_file.write_bytes(pattern(3 * MiB, seed=998))
    up = Upstream("nbdkit", up_file, tmp_path, tcp=False)
    upstreams.append(up)
    wrong = tmp_path / "wrong.pass"
    wrong.write_bytes(b"not the passphrase")
    need("clevis", "socat", TANGD)
    tang = Tang(tmp_path, "a")
    bound, bound_plain, bound_header = tang_volume(tmp_path, detached=True)
    bind(bound_header, bound.payload.parent / "vol.pass", "tang", {"url": tang.url})
    extra = (f'[exports.raw]\nraw = "{raw}"\nread-only = true\n\n'
             f'[exports.upstream]\nraw = "{up.uri}"\n\n'
             f'[exports.tang]\npayload = "{bound.payload}"\nheader = "{bound_header}"\n\n'
             f'[exports.wrong]\npayload = "{made[0][0].payload}"\nkey-file = "{wrong}"\n')
    cfg = write_config(tmp_path, made, range(200), extra)
    started = time.monotonic()
    port = free_port()
    served = nbdluks("--config", str(cfg), "--metrics", str(port))
    # listening starts at once; the exports are listed as they unlock
    wait_for(lambda: bool(log_events(served.log.read_text(), "exports ready")))
    took = time.monotonic() - started
    names = [f"v{i}" for i in range(200)]
    assert listed(served) == [[n, f"volume {n}"] for n in names] + [
        ["raw", ""], ["upstream", ""], ["tang", ""]]
    got = read(served, [*names, "raw", "upstream", "tang"])
    for i in range(200):
        assert got[f"v{i}"] == digests(made[i][1]), f"v{i}"
    assert got["raw"] == digests(raw.read_bytes())
    assert got["upstream"] == digests(up_file.read_bytes())
    assert got["tang"] == digests(bound_plain)
    tang.stop()
    failed = log_events(served.log.read_text(), "export not served")
    assert [(e["export"], e["kind"]) for e in failed] == [("wrong", "WrongKeyError")]
    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def read_bytes(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                   name: str) -> float:
        return samples.get(("nbdluks_export_bytes_total",
                            (("direction", "read"), ("export", name))), 0)

    sizes = {name: int(got[name][2]) for name in ("v0", "v199", "raw", "upstream")}  # type: ignore[call-overload]
    # counts reach the shared table when a connection closes (or within 0.5 s)
    wait_for(lambda: all(read_bytes(scrape(), n) == 2 * min(sz, MiB)
                         for n, sz in sizes.items()))
    samples = scrape()
    assert samples[("nbdluks_exports", ())] == 203
    assert samples[("nbdluks_exports_failed", ())] == 1
    for name in sizes:
        assert samples[("nbdluks_export_requests_total", (("export", name),))] >= 2
    assert ("nbdluks_export_requests_total", (("export", "wrong"),)) not in samples
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
        assert r.status == 200  # one failed export is not the server's health
    print(f"200 volumes listed {took:.1f} s after start")


def wait_for(cond: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_reload_adds_and_removes_while_a_client_reads(nbdluks: Callable[..., Served],
                                                      volumes, tmp_path: Path) -> None:
    made = volumes
    cfg = write_config(tmp_path, made, range(0, 60))
    served = nbdluks("--config", str(cfg))
    stop = tmp_path / "stop"
    # a reader of an unchanged export, and one of an export about to go
    keep = subprocess.Popen([SYSTEM_PYTHON, "-c", LOOP, str(served.socket), "v0", str(stop)],
                            stdout=subprocess.PIPE, text=True)
    gone = subprocess.Popen([SYSTEM_PYTHON, "-c", LOOP, str(served.socket), "v59",
                             str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        for p in (keep, gone):
            assert p.stdout is not None and p.stdout.readline().strip() == "connected"
        write_config(tmp_path, made, [*range(0, 40), *range(60, 80)])  # -20, +20
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: bool(log_events(served.log.read_text(), "configuration reloaded")))
        (event,) = log_events(served.log.read_text(), "configuration reloaded")
        assert sorted(event["retired"]) == sorted(f"v{i}" for i in range(40, 60))
        assert sorted(event["added"]) == sorted(f"v{i}" for i in range(60, 80))
        # the removed export's client got its answers, then a clean close
        assert gone.wait(60) == 0
        assert gone.stdout is not None and "error" in gone.stdout.read()
        names = [n for n, _ in listed(served)]
        assert names == [f"v{i}" for i in [*range(0, 40), *range(60, 80)]]
        got = read(served, ["v0", "v65", "v79"])
        for i in (0, 65, 79):
            assert got[f"v{i}"] == digests(made[i][1])
        # a broken file changes nothing
        cfg.write_text("[exports.x\n")
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: bool(log_events(served.log.read_text(), "configuration not reloaded")))
        assert [n for n, _ in listed(served)] == names
    finally:
        stop.touch()
    out, _ = keep.communicate(timeout=60)
    assert keep.returncode == 0 and out.split()[-2:] == ["errors", "0"], out
    assert int(out.split()[-3]) > 0
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0
    assert not os.path.exists(str(served.socket))


def test_reload_refuses_an_upstream_without_multi_conn(nbdluks: Callable[..., Served],
                                                        volumes, tmp_path: Path) -> None:
    """Two processes serve; an added NBD source that does not allow
    multi-conn is not served (a FLUSH through one process's connection would
    not cover the other's writes); the rest of the reload is."""
    made = volumes
    img = tmp_path / "nomc.img"
    img.write_bytes(bytes(1 << 20))
    sock = tmp_path / "nomc.sock"
    up = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock),
                           "--filter=multi-conn", "file", str(img),
                           "multi-conn-mode=disable"])
    try:
        cfg = write_config(tmp_path, made, range(0, 2))
        served = nbdluks("--config", str(cfg))
        write_config(tmp_path, made, range(0, 3),
                     f'[exports.nomc]\nraw = "nbd+unix:///?socket={sock}"\n')
        served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: bool(log_events(served.log.read_text(), "configuration reloaded")))
        (event,) = log_events(served.log.read_text(), "configuration reloaded")
        assert event["added"] == ["v2"] and event["failed"] == ["nomc"]
        assert [n for n, _ in listed(served)] == ["v0", "v1", "v2"]
        refused = log_events(served.log.read_text(), "export not served")
        assert [(e["export"], e["kind"]) for e in refused] == [("nomc", "MultiConnError")]
    finally:
        up.kill()
        up.wait()
