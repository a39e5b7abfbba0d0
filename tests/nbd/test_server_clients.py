"""The raw-file server against real clients: qemu-io, qemu-img, nbdinfo,
nbdcopy, fio."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import need, pattern, run

MiB = 1024 * 1024


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(64 * MiB)
    return p


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_qemu_io_patterns_zero_fua_discard_flush(nbdluks, disk: Path, transport: str) -> None:
    need("qemu-io")
    srv = nbdluks("--raw", str(disk), tcp=True)
    uri = srv.uri if transport == "unix" else srv.tcp_uri
    cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1M 4k",
        "write -P 0x11 3157073 777",  # unaligned, byte-granular (3M + 12345)
        "write -z 2M 1M",
        "write -f -P 0x33 4M 64k",
        "discard 8M 1M",
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 4k",
        "read -P 0x11 3157073 777",
        "read -P 0 2M 1M",
        "read -P 0x33 4M 64k",
        "read -P 0 8M 1M",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run([*args, uri]).stdout
    assert "Pattern verification failed" not in out
    assert out.count("read ") == 6
    data = disk.read_bytes()
    assert data[:MiB] == b"\xab" * MiB
    assert data[3157073 : 3157073 + 777] == b"\x11" * 777
    assert data[3157072] == 0 and data[3157073 + 777] == 0
    assert data[MiB : MiB + 4096] == b"\xcd" * 4096
    assert data[4 * MiB : 4 * MiB + 65536] == b"\x33" * 65536
    assert srv.stop() == 0


def test_qemu_img_info_compare_convert_map(nbdluks, disk: Path, tmp_path: Path) -> None:
    need("qemu-img")
    data = pattern(2 * MiB)
    with open(disk, "r+b") as f:
        f.seek(16 * MiB)
        f.write(data)
    srv = nbdluks("--raw", str(disk))
    info = json.loads(run(["qemu-img", "info", "--output=json", srv.uri]).stdout)
    assert info["virtual-size"] == 64 * MiB
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk), srv.uri])
    copy = tmp_path / "copy.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(copy)])
    assert copy.read_bytes() == disk.read_bytes()
    extents = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", srv.uri]).stdout)
    data_ranges = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data_ranges == [(16 * MiB, 2 * MiB)]
    holes = [e for e in extents if not e["data"]]
    assert all(e["zero"] for e in holes) and sum(e["length"] for e in holes) == 62 * MiB
    # convert into the server too (write path), then compare
    src = tmp_path / "src.img"
    src.write_bytes(pattern(8 * MiB, seed=7))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri])
    assert disk.read_bytes()[: 8 * MiB] == src.read_bytes()


def test_nbdinfo_flags_contexts_block_sizes_and_list(nbdluks, disk: Path) -> None:
    need("nbdinfo")
    srv = nbdluks("--raw", str(disk), "-D", "a test disk", export="disk0")
    info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    exp = info["exports"][0]
    assert exp["export-name"] == "disk0"
    assert exp["export-size"] == 64 * MiB
    assert exp["description"] == "a test disk"
    assert "base:allocation" in exp["contexts"]
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_multi_conn", "can_cache", "can_df"):
        assert exp[flag] is True, flag
    assert exp["is_read_only"] is False
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 64 * MiB
    listing = run(["nbdinfo", "--list", "--json", srv.uri]).stdout
    exports = json.loads(listing)["exports"]
    assert [(e["export-name"], e.get("export-description", e.get("description")))
            for e in exports] == [("disk0", "a test disk")]
    ro = nbdluks("--raw", str(disk), "-r")
    info = json.loads(run(["nbdinfo", "--json", ro.uri]).stdout)["exports"][0]
    assert info["is_read_only"] is True and info["can_trim"] is False


def test_nbdinfo_map_shows_holes(nbdluks, disk: Path) -> None:
    need("nbdinfo")
    with open(disk, "r+b") as f:
        f.seek(4 * MiB)
        f.write(b"x" * MiB)
    srv = nbdluks("--raw", str(disk))
    out = json.loads(run(["nbdinfo", "--map", "--json", srv.uri]).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in out]
    assert got == [(0, 4 * MiB, 3), (4 * MiB, MiB, 0), (5 * MiB, 59 * MiB, 3)]


def test_nbdcopy_round_trip_four_connections(nbdluks, disk: Path, tmp_path: Path) -> None:
    need("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(pattern(64 * MiB, seed=3))
    srv = nbdluks("--raw", str(disk))
    run(["nbdcopy", "-C", "4", "--requests=16", str(src), srv.uri])
    assert disk.read_bytes() == src.read_bytes()
    back = tmp_path / "back.img"
    run(["nbdcopy", "-C", "4", srv.uri, str(back)])
    assert back.read_bytes() == src.read_bytes()
    assert "connection opened" in srv.log_text()


def test_fio_random_writes_verify(nbdluks, disk: Path, tmp_path: Path) -> None:
    need("fio")
    srv = nbdluks("--raw", str(disk))
    job = [
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={srv.uri}",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=32M",
        "--verify=crc32c", "--do_verify=1", "--verify_state_save=0", "--verify_fatal=1",
        "--output-format=json",
    ]
    p = run(job, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(p.stdout[p.stdout.index("{"):])
    job0 = result["jobs"][0]
    assert job0["error"] == 0
    assert job0["write"]["io_bytes"] == 32 * MiB
    assert job0["read"]["io_bytes"] == 32 * MiB  # the verify pass


def test_many_clients_at_once(nbdluks, disk: Path) -> None:
    need("qemu-io")
    import subprocess

    srv = nbdluks("--raw", str(disk))
    procs = [
        subprocess.Popen(
            ["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i}M 1M",
             "-c", f"read -P {i + 1} {i}M 1M", srv.uri],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(8)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "verification failed" not in out, out
    data = disk.read_bytes()
    for i in range(8):
        assert data[i * MiB : (i + 1) * MiB] == bytes([i + 1]) * MiB


def test_sigterm_drains_and_exits_zero(nbdluks, disk: Path) -> None:
    srv = nbdluks("--raw", str(disk))
    assert srv.socket and os.path.exists(srv.socket)
    assert srv.stop() == 0
    assert "server stopped" in srv.log_text()
    assert not os.path.exists(srv.socket)  # the socket is cleaned up
