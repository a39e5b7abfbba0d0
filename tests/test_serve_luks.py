"""The product end to end: a LUKS volume (detached header or not, from files
or from upstream NBD servers) served decrypted and read-write to real
clients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Served, Upstream, libnbd, need, pattern, run, wait_listening
from tests.luks.reference import Made, fill, luks_format, read_plain
from tests.luks.test_headers import rewrite_json

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _tools() -> None:
    need("cryptsetup", "qemu-img", "qemu-io", "nbdcopy")


def volume(tmp_path: Path, **kw: object) -> tuple[Made, bytes]:
    made = luks_format(tmp_path, **kw)  # type: ignore[arg-type]
    size = (made.payload.stat().st_size - made.offset) // made.sector_size * made.sector_size
    plain = pattern(size, seed=size % 1000)
    fill(made, plain)
    (tmp_path / "pass.txt").write_bytes(made.passphrase + b"\n")
    return made, plain


def luks_args(made: Made, tmp_path: Path, header: str | None = None,
              payload: str | None = None) -> list[str]:
    args = ["--payload", payload or str(made.payload),
            "--passphrase-file", str(tmp_path / "pass.txt")]
    if header or made.header:
        args += ["--header", header or str(made.header)]
    return args


def compare(uri: str, plain: bytes, tmp_path: Path) -> None:
    ref = tmp_path / "plain.ref"
    ref.write_bytes(plain)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), uri])
    out = tmp_path / "copy.out"
    run(["nbdcopy", "-C", "4", uri, str(out)])
    assert out.read_bytes() == plain


@pytest.mark.parametrize("version", [1, 2])
def test_seed_scenario_detached_header_files(nbdluks, tmp_path: Path, version: int) -> None:
    made, plain = volume(tmp_path, version=version, detached=True, size=16 * MiB)
    srv = nbdluks(*luks_args(made, tmp_path), tcp=True)
    compare(srv.uri, plain, tmp_path)
    compare(srv.tcp_uri, plain, tmp_path)
    assert srv.stop() == 0


@pytest.mark.parametrize(
    ("kind", "tcp"), [("nbdkit", False), ("qemu-nbd", False), ("nbdkit", True), ("qemu-nbd", True)]
)
@pytest.mark.parametrize("version", [1, 2])
def test_seed_scenario_from_upstream_servers(nbdluks, upstreams, tmp_path: Path, kind: str,
                                             tcp: bool, version: int) -> None:
    need(kind)
    made, plain = volume(tmp_path, version=version, detached=True, size=8 * MiB)
    assert made.header
    hdr = Upstream(kind, made.header, tmp_path, tcp, read_only=True)
    pay = Upstream(kind, made.payload, tmp_path, tcp)
    upstreams += [hdr, pay]
    srv = nbdluks(*luks_args(made, tmp_path, header=hdr.uri, payload=pay.uri))
    compare(srv.uri, plain, tmp_path)
    # and a write travels through to the upstream payload, encrypted
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 1M 64k", "-c", "flush", srv.uri])
    assert read_plain(made, 65536, at=MiB) == b"\x3c" * 65536
    assert srv.stop() == 0


@pytest.mark.parametrize(
    "kw",
    [
        {"version": 1, "cipher": "aes-cbc-essiv:sha256", "key_bits": 256},
        {"version": 1, "cipher": "aes-xts-plain", "key_bits": 256, "hash": "sha1"},
        {"version": 2, "pbkdf": "argon2id", "sector_size": 4096},
        {"version": 2, "pbkdf": "argon2i", "sector_size": 1024},
        {"version": 2, "cipher": "aes-cbc-essiv:sha256", "key_bits": 256, "sector_size": 2048},
    ],
    ids=lambda kw: "-".join(str(v) for v in kw.values()),
)
def test_cipher_and_format_matrix_served(nbdluks, tmp_path: Path, kw: dict[str, object]) -> None:
    made, plain = volume(tmp_path, size=20 * MiB, **kw)
    srv = nbdluks(*luks_args(made, tmp_path))
    compare(srv.uri, plain, tmp_path)


@pytest.mark.parametrize("version", [1, 2])
def test_writes_decrypt_independently(nbdluks, tmp_path: Path, version: int) -> None:
    ss = 512 if version == 1 else 4096
    made, plain = volume(tmp_path, version=version, size=20 * MiB,
                         **({"sector_size": 4096} if version == 2 else {}))
    header_before = made.payload.read_bytes()[: made.offset]
    srv = nbdluks(*luks_args(made, tmp_path))
    io = [
        "write -P 0x11 0 1M",          # aligned
        "write -P 0x22 1000 3000",     # unaligned, inside and across sectors
        "write -P 0x33 8191 2",        # straddles a sector boundary
        "write -f -P 0x44 2M 64k",     # FUA
        "write -z 3M 256k",            # WRITE_ZEROES: encrypted zeroes
        "write -z 4000 200",           # unaligned zeroes
        "flush",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in io:
        args += ["-c", c]
    run([*args, srv.uri])
    expect = bytearray(plain)
    expect[0:MiB] = b"\x11" * MiB
    expect[1000:4000] = b"\x22" * 3000
    expect[8191:8193] = b"\x33" * 2
    expect[2 * MiB : 2 * MiB + 65536] = b"\x44" * 65536
    expect[3 * MiB : 3 * MiB + 262144] = bytes(262144)
    expect[4000:4200] = bytes(200)
    got = read_plain(made, len(plain))
    assert got == bytes(expect)
    # the header is untouched; zeroes were written as ciphertext, not holes
    assert made.payload.read_bytes()[: made.offset] == header_before
    with open(made.payload, "rb") as f:
        f.seek(made.offset + 3 * MiB)
        assert f.read(4096) != bytes(4096)
    assert ss in (512, 4096)
    if version == 1:
        # qemu's own LUKS driver reads what we wrote
        out = tmp_path / "qemu.raw"
        secret = tmp_path / "vol.pass"
        run(["qemu-img", "convert", "--object", f"secret,id=s0,file={secret}", "--image-opts",
             f"driver=luks,file.filename={made.payload},key-secret=s0", "-O", "raw", str(out)])
        assert out.read_bytes() == bytes(expect)


def test_fixed_size_segment_leaves_the_tail_alone(nbdluks, tmp_path: Path) -> None:
    # a fixed-size segment: the rest of the payload is not ours
    made, _plain = volume(tmp_path, size=20 * MiB)
    rewrite_json(made.payload, lambda md: md["segments"]["0"].update(size=str(2 * MiB)))
    tail_before = made.payload.read_bytes()[made.offset + 2 * MiB :]
    srv = nbdluks(*luks_args(made, tmp_path))
    info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
    assert info["export-size"] == 2 * MiB
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 2M", srv.uri])
    script = r"""
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 4096, 2 * 1024 * 1024 - 2048); print("wrote")
except nbd.Error as e:
    print(e.errno)
"""
    assert libnbd(script, srv.uri).strip() == "ENOSPC"
    assert read_plain(made, 2 * MiB) == b"\x66" * (2 * MiB)
    assert made.payload.read_bytes()[made.offset + 2 * MiB :] == tail_before


def test_block_size_info_and_kernel_style_unaligned_io(nbdluks, tmp_path: Path) -> None:
    made, _plain = volume(tmp_path, sector_size=4096, detached=True, size=4 * MiB)
    srv = nbdluks(*luks_args(made, tmp_path))
    info = json.loads(run(["nbdinfo", "--json", srv.uri]).stdout)["exports"][0]
    assert info["block_size_minimum"] == 4096
    assert info["can_trim"] is False and info["can_fast_zero"] is False
    assert info["can_zero"] is True and info["can_multi_conn"] is True
    # 512-byte requests, as the kernel sends them, from a raw libnbd client
    script = r"""
h.connect_uri(sys.argv[1])
for i in range(16):
    h.pwrite(bytes([i + 1]) * 512, 4096 + i * 512)
print(h.pread(512, 4096 + 5 * 512).hex()[:4])
"""
    assert libnbd(script, srv.uri).strip() == "0606"
    got = read_plain(made, 8192, at=4096)
    assert got == b"".join(bytes([i + 1]) * 512 for i in range(16))


def test_two_clients_disjoint_ranges_and_fio_verify(nbdluks, tmp_path: Path) -> None:
    need("fio")
    made, _ = volume(tmp_path, detached=True, size=64 * MiB)
    srv = nbdluks(*luks_args(made, tmp_path))
    procs = [
        subprocess.Popen(["qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i * 8}M 8M",
                          "-c", f"read -P {i + 1} {i * 8}M 8M", srv.uri],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and "failed" not in out, out
    assert read_plain(made, 16 * MiB) == b"\x01" * (8 * MiB) + b"\x02" * (8 * MiB)
    job = ["fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
           "--bs=4k", "--iodepth=16", "--size=16M", "--offset=32M", "--verify=crc32c",
           "--do_verify=1", "--verify_state_save=0", "--verify_fatal=1", "--output-format=json"]
    p = run(job, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    assert res["error"] == 0 and res["read"]["io_bytes"] == 16 * MiB


def test_read_only_and_discards(nbdluks, tmp_path: Path) -> None:
    made, plain = volume(tmp_path, detached=True, size=4 * MiB)
    ro = nbdluks(*luks_args(made, tmp_path), "-r")
    script = r"""
h.connect_uri(sys.argv[1])
try:
    h.pwrite(b"x" * 4096, 0); print("wrote")
except nbd.Error as e:
    print(e.errno)
"""
    assert libnbd(script, ro.uri).strip() == "EPERM"
    ro.stop()
    disc = nbdluks(*luks_args(made, tmp_path), "--allow-discards")
    info = json.loads(run(["nbdinfo", "--json", disc.uri]).stdout)["exports"][0]
    assert info["can_trim"] is True
    run(["qemu-io", "-f", "raw", "-c", "discard 1M 1M", disc.uri])
    with open(made.payload, "rb") as f:
        f.seek(made.offset + MiB)
        assert f.read(MiB) == bytes(MiB)  # punched in the payload
    assert read_plain(made, MiB) == plain[:MiB]


def test_wrong_passphrase_exits_before_listening(tmp_path: Path) -> None:
    made, _ = volume(tmp_path, detached=True, size=MiB)
    bad = tmp_path / "bad.txt"
    bad.write_text("hunter2-wrong\n")
    sock = tmp_path / "s.sock"
    assert made.header
    p = subprocess.run(
        [sys.executable, "-m", "nbdluks", "serve", "--payload", str(made.payload), "--header",
         str(made.header), "--passphrase-file", str(bad), "-k", str(sock)],
        capture_output=True, text=True, timeout=60,
    )
    assert p.returncode != 0
    assert "no key slot matches this passphrase" in p.stderr
    assert "hunter2" not in p.stdout + p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not sock.exists()


def test_secrets_from_stdin_and_fd_never_logged(nbdluks, tmp_path: Path) -> None:
    made, plain = volume(tmp_path, detached=True, size=2 * MiB, passphrase=b"s3cr3t-Passw0rd")
    assert made.header
    srv = nbdluks("--payload", str(made.payload), "--header", str(made.header),
                  "--passphrase-file", "-", stdin=b"s3cr3t-Passw0rd\n")
    compare(srv.uri, plain, tmp_path)
    srv.stop()
    log = srv.log_text()
    assert "volume unlocked" in log
    from nbdluks.luks import evp

    if evp._xtsloop is not None:  # the C helper: every AES-XTS request
        engine = "openssl-evp+c"
    else:
        engine = "openssl-evp" if made.sector_size == 4096 else "numpy+openssl-evp"
    assert f'"cipher_engine": "{engine}"' in log
    assert "s3cr3t" not in log and made.key.hex() not in log
    # the process title / command line never carries the secret either
    assert b"s3cr3t" not in Path(f"/proc/{os.getpid()}/cmdline").read_bytes()


def over_nbdkit(nbdluks, upstreams, tmp_path: Path, *extra: str
                ) -> tuple[Made, bytes, Upstream, Served]:
    """A detached-header volume whose payload nbdkit exports, served."""
    need("nbdkit")
    made, plain = volume(tmp_path, detached=True, size=4 * MiB)
    assert made.header
    pay = Upstream("nbdkit", made.payload, tmp_path, tcp=False)
    upstreams.append(pay)
    return made, plain, pay, nbdluks(*luks_args(made, tmp_path, payload=pay.uri), *extra)


def libnbd_client(script: str, uri: str) -> subprocess.Popen[str]:
    """A python3-libnbd client (`h`) running `script`, talked to over pipes."""
    return subprocess.Popen(["/usr/bin/python3", "-c", "import nbd, sys\nh = nbd.NBD()\n" + script,
                             uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_upstream_death_gives_eio_not_a_crash(nbdluks, upstreams, tmp_path: Path) -> None:
    _, plain, pay, srv = over_nbdkit(nbdluks, upstreams, tmp_path)
    script = r"""
import time
h.connect_uri(sys.argv[1])
first = h.pread(4096, 0)
print(first.hex()[:8])
sys.stdout.flush()
time.sleep(3)
for i in range(2):
    try:
        h.pread(4096, 8192); print("read")
    except nbd.Error as e:
        print(e.errno)
"""
    proc = libnbd_client(script, srv.uri)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == plain[:4].hex()
    pay.proc.kill()
    pay.proc.wait()
    out, _ = proc.communicate(timeout=60)
    assert out.split() == ["EIO", "EIO"]
    assert srv.proc.poll() is None  # still serving
    # the final flush could not reach the payload: the exit status says so
    assert srv.stop() == 1
    assert "final flush failed" in srv.log_text()


def test_stalled_upstream_times_out_with_eio(nbdluks, tmp_path: Path) -> None:
    need("nbdkit")
    made, _ = volume(tmp_path, detached=True, size=4 * MiB)
    assert made.header
    sock = tmp_path / "slow.sock"
    log = tmp_path / "slow.log"
    with open(log, "wb") as f:
        slow = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "--filter=delay", "file",
                                 f"file={made.payload}", "delay-read=30"],
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_listening(slow, str(sock), None, log)
        srv = nbdluks(*luks_args(made, tmp_path, payload=f"nbd+unix:///?socket={sock}"),
                      "--upstream-timeout", "2")
        script = r"""
import time
h.connect_uri(sys.argv[1])
t = time.monotonic()
try:
    h.pread(4096, 0); print("read")
except nbd.Error as e:
    print(e.errno, round(time.monotonic() - t))
"""
        errno_name, seconds = libnbd(script, srv.uri).split()
        assert errno_name == "EIO" and int(seconds) <= 4
        assert srv.proc.poll() is None
        assert srv.stop() == 0  # a new connection replaced the stalled one: the flush works
        assert "upstream reconnected" in srv.log_text()
        assert "no reply within 2 s" in srv.log_text()
    finally:
        slow.kill()
        slow.wait()


def _restart(pay: Upstream, cmd_tail: list[str] | None = None) -> subprocess.Popen[bytes]:
    """Kill an nbdkit upstream and start another on the same socket."""
    pay.proc.kill()
    pay.proc.wait()
    assert pay.sock
    Path(pay.sock).unlink(missing_ok=True)
    time.sleep(1.5)  # the requests in flight meanwhile wait for the reconnect
    with open(pay.log, "ab") as f:
        pay.proc = subprocess.Popen(["nbdkit", "-f", "-U", pay.sock, *(cmd_tail or [])],
                                    stdout=f, stderr=subprocess.STDOUT)
    wait_listening(pay.proc, pay.sock, None, pay.log)
    return pay.proc


RECONNECT_SCRIPT = r"""
h.connect_uri(sys.argv[1])
print(h.pread(4096, 0).hex()[:8], flush=True)
h.pwrite(b"\x5b" * 4096, 8192)  # acknowledged, not flushed
print("written", flush=True)
sys.stdin.readline()  # the upstream is being restarted
print(h.pread(4096, 0).hex()[:8])
for i in range(2):
    try:
        h.flush(); print("flushed")
    except nbd.Error as e:
        print(e.errno)
print(h.pread(4096, 8192) == b"\x5b" * 4096)
"""


def test_upstream_restart_is_survived_with_reconnect(nbdluks, upstreams, tmp_path: Path) -> None:
    made, plain, pay, srv = over_nbdkit(nbdluks, upstreams, tmp_path,
                                        "--upstream-reconnect", "30")
    proc = libnbd_client(RECONNECT_SCRIPT, srv.uri)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == plain[:4].hex()
    assert proc.stdout.readline().strip() == "written"
    pay.proc.kill()
    pay.proc.wait()
    proc.stdin.write("go\n")  # this read now waits for the upstream to come back
    proc.stdin.flush()
    _restart(pay, ["file", f"file={made.payload}"])
    out, _ = proc.communicate(timeout=60)
    # the read was served; the first FLUSH says the unflushed write may be
    # lost (the upstream went away before flushing it), the next one is clean
    assert out.split() == [plain[:4].hex(), "EIO", "flushed", "True"]
    log = srv.log_text()
    assert "upstream connection lost, reconnecting" in log and "upstream reconnected" in log
    assert read_plain(made, 4096, 8192) == b"\x5b" * 4096
    assert srv.stop() == 0


def test_an_upstream_that_comes_back_different_gives_eio(nbdluks, upstreams,
                                                         tmp_path: Path) -> None:
    _, plain, pay, srv = over_nbdkit(nbdluks, upstreams, tmp_path, "--upstream-reconnect", "30")
    script = r"""
h.connect_uri(sys.argv[1])
print(h.pread(4096, 0).hex()[:8], flush=True)
sys.stdin.readline()
try:
    h.pread(4096, 0); print("read")
except nbd.Error as e:
    print(e.errno)
"""
    proc = libnbd_client(script, srv.uri)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == plain[:4].hex()
    _restart(pay, ["memory", "size=1M"])  # another export on the same socket
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=60)
    assert out.split() == ["EIO"]
    assert "came back as a different export" in srv.log_text()
    assert srv.proc.poll() is None


def test_after_the_reconnect_window_requests_fail_fast_until_the_upstream_is_back(
        nbdluks, upstreams, tmp_path: Path) -> None:
    made, plain, pay, srv = over_nbdkit(nbdluks, upstreams, tmp_path,
                                        "--upstream-reconnect", "2")
    script = r"""
import time
h.connect_uri(sys.argv[1])
print(h.pread(4096, 0).hex()[:8], flush=True)
sys.stdin.readline()  # the upstream is gone now
for i in range(2):
    t = time.monotonic()
    try:
        h.pread(4096, 0); print("read")
    except nbd.Error as e:
        print(e.errno, round(time.monotonic() - t, 1))
print("down", flush=True)
sys.stdin.readline()  # the upstream is back
for i in range(20):  # service resumes by itself, within moments
    try:
        print(h.pread(4096, 0).hex()[:8]); break
    except nbd.Error:
        time.sleep(0.5)
"""
    proc = libnbd_client(script, srv.uri)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == plain[:4].hex()
    pay.proc.kill()
    pay.proc.wait()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    first = proc.stdout.readline().split()
    second = proc.stdout.readline().split()
    assert first[0] == "EIO" and 1.5 <= float(first[1]) <= 6  # waited out the window
    assert second[0] == "EIO" and float(second[1]) < 1.5  # then fails at once
    assert proc.stdout.readline().strip() == "down"
    _restart(pay, ["file", f"file={made.payload}"])
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=60)
    assert out.split() == [plain[:4].hex()]  # and recovers once it is back


def test_a_dead_upstream_is_survived_by_default(nbdluks, upstreams, tmp_path: Path) -> None:
    made, plain, pay, srv = over_nbdkit(nbdluks, upstreams, tmp_path)  # default options
    script = r"""
import time
h.connect_uri(sys.argv[1])
h.pwrite(b"\x6c" * 4096, 12288)  # acknowledged, not flushed
print("written", flush=True)
sys.stdin.readline()  # the upstream is gone
try:
    h.pread(4096, 0); print("read")
except nbd.Error as e:
    print(e.errno, flush=True)
sys.stdin.readline()  # the upstream is back
for i in range(20):  # no restart of ours: the service resumes by itself
    try:
        print(h.pread(4096, 0).hex()[:8]); break
    except nbd.Error:
        time.sleep(0.5)
for i in range(2):
    try:
        h.flush(); print("flushed")
    except nbd.Error as e:
        print(e.errno)
"""
    proc = libnbd_client(script, srv.uri)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "written"
    pay.proc.kill()
    pay.proc.wait()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "EIO"  # at once, while it is gone
    _restart(pay, ["file", f"file={made.payload}"])
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=60)
    # served again; the first FLUSH reports the write that may have been lost
    assert out.split() == [plain[:4].hex(), "EIO", "flushed"]
    assert "upstream reconnected" in srv.log_text()
    assert srv.stop() == 0
