"""TLS: libnbd's tools and qemu attach over nbds:// with certificates made
here; --tls require refuses the clear; --tls-verify-peer wants a client
certificate; a broken TLS handshake costs only its own connection."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nbdluks.nbd.constants import Opt, Rep
from nbdluks.nbd.wire import encode_option
from tests.conftest import Served, free_port, need, pattern, run, wait_listening
from tests.luks.reference import read_plain
from tests.test_serve_luks import compare, luks_args, volume

MiB = 1 << 20


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, cn: str, *, ca: bool = False,
           server: bool = False) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(hours=1))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                          False), critical=True)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    signer = key if ca else ca_key
    return key, b.sign(signer, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(root: Path, ca_name: str = "nbdluks test CA") -> dict[str, Path]:
    """server/: what nbdluks reads; client/: CA and a client certificate (as
    libnbd and qemu read them); anon/: the CA only."""
    ca_key, ca_cert = _issue(None, _name(ca_name), ca_name,  # type: ignore[arg-type]
                             ca=True)
    srv_key, srv_cert = _issue(ca_key, ca_cert.subject, "localhost", server=True)
    cli_key, cli_cert = _issue(ca_key, ca_cert.subject, "test client")
    dirs = {d: root / d for d in ("server", "client", "anon")}
    for d in dirs.values():
        d.mkdir()
        (d / "ca-cert.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (dirs["server"] / "server-cert.pem").write_bytes(
        srv_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(srv_key, dirs["server"] / "server-key.pem")
    (dirs["client"] / "client-cert.pem").write_bytes(
        cli_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(cli_key, dirs["client"] / "client-key.pem")
    return dirs


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytes]:
    data = pattern(4 * MiB, seed=5)
    p = tmp_path / "disk.img"
    p.write_bytes(data)
    return p, data


def nbds(srv: Served, certs: Path) -> str:
    return f"nbds://localhost:{srv.port}/?tls-certificates={certs}"


def test_tls_on_clients_read_and_write_over_tls(nbdluks: Callable[..., Served], pki: dict,
                                                disk: tuple[Path, bytes], tmp_path: Path) -> None:
    need("nbdcopy", "nbdinfo", "qemu-img", "qemu-io")
    img, data = disk
    srv = nbdluks("--raw", str(img), "--tls", "on", "--tls-certificates", str(pki["server"]),
                  tcp=True, unix=False)
    out = tmp_path / "copy.img"
    run(["nbdcopy", nbds(srv, pki["anon"]), str(out)])
    assert out.read_bytes() == data
    assert "newstyle-fixed with TLS" in run(["nbdinfo", nbds(srv, pki["anon"])]).stdout
    # "on": a client that does not ask for TLS is served in the clear
    assert "newstyle-fixed without TLS" in run(["nbdinfo", srv.tcp_uri]).stdout
    # qemu with its own TLS stack writes and reads back
    obj = f"tls-creds-x509,id=tls0,dir={pki['anon']},endpoint=client"
    opts = f"driver=nbd,host=localhost,port={srv.port},tls-creds=tls0"
    run(["qemu-io", "--object", obj, "--image-opts", opts, "-c", "write -P 0x3c 1M 64k"])
    p = run(["qemu-io", "--object", obj, "--image-opts", opts, "-c", "read -P 0x3c 1M 64k"])
    assert "read 65536/65536" in p.stdout
    assert img.read_bytes()[MiB : MiB + 65536] == b"\x3c" * 65536
    log = srv.log_text()
    assert '"TLS started"' in log and '"tls": true' in log


def test_tls_require_refuses_the_clear(nbdluks: Callable[..., Served], pki: dict,
                                       disk: tuple[Path, bytes]) -> None:
    need("nbdinfo")
    img, _ = disk
    srv = nbdluks("--raw", str(img), "--tls", "require", "--tls-certificates",
                  str(pki["server"]), tcp=True, unix=False)
    p = run(["nbdinfo", srv.tcp_uri], check=False)
    assert p.returncode != 0
    assert "4194304" in run(["nbdinfo", "--size", nbds(srv, pki["anon"])]).stdout


def test_tls_verify_peer_wants_a_client_certificate(nbdluks: Callable[..., Served], pki: dict,
                                                    disk: tuple[Path, bytes]) -> None:
    need("nbdinfo")
    img, _ = disk
    srv = nbdluks("--raw", str(img), "--tls", "require", "--tls-certificates",
                  str(pki["server"]), "--tls-verify-peer", tcp=True, unix=False)
    assert run(["nbdinfo", nbds(srv, pki["anon"])], check=False).returncode != 0
    assert "4194304" in run(["nbdinfo", "--size", nbds(srv, pki["client"])]).stdout
    log = srv.log_text()
    assert "TLS handshake failed" in log
    assert '"client": "test client"' in log  # who connected, by certificate


def test_a_broken_tls_handshake_costs_only_its_connection(
        nbdluks: Callable[..., Served], pki: dict, disk: tuple[Path, bytes]) -> None:
    need("nbdinfo")
    img, _ = disk
    srv = nbdluks("--raw", str(img), "--tls", "on", "--tls-certificates", str(pki["server"]),
                  tcp=True, unix=False)
    assert srv.port
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.recv(18)  # greeting
        s.sendall(struct.pack(">I", 3) + encode_option(Opt.STARTTLS))
        _, opt, rep, n = struct.unpack(">QIII", s.recv(20))
        assert (opt, rep, n) == (Opt.STARTTLS, Rep.ACK, 0)
        s.sendall(b"this is not a TLS ClientHello" * 10)
        while s.recv(4096):  # perhaps a TLS alert, then the server hangs up
            pass  # (a timeout here fails the test)
    assert "4194304" in run(["nbdinfo", "--size", nbds(srv, pki["anon"])]).stdout
    assert "TLS handshake failed" in srv.log_text()


def test_a_client_silent_after_starttls_is_closed_and_the_server_stops_at_once(
        nbdluks: Callable[..., Served], pki: dict, disk: tuple[Path, bytes]) -> None:
    img, _ = disk
    srv = nbdluks("--raw", str(img), "--tls", "on", "--tls-certificates", str(pki["server"]),
                  "--handshake-limit", "1", "--processes", "1", tcp=True, unix=False)
    assert srv.port
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.recv(18)  # greeting
        s.sendall(struct.pack(">I", 3) + encode_option(Opt.STARTTLS))
        _, opt, rep, n = struct.unpack(">QIII", s.recv(20))
        assert (opt, rep, n) == (Opt.STARTTLS, Rep.ACK, 0)
        t = time.monotonic()
        assert s.recv(4096) == b""  # silent: closed after the handshake limit
        assert time.monotonic() - t < 5
    t = time.monotonic()
    assert srv.stop() == 0
    # before: the connection stayed counted as open, and the drain waited 30 s for it
    assert time.monotonic() - t < 3, time.monotonic() - t


@pytest.mark.parametrize(("args", "message"), [
    (["--tls", "on"], "needs --tls-certificates"),
    (["--tls-certificates", "/nonexistent"], "need --tls on or require"),
    (["--tls", "on", "--tls-certificates", "/nonexistent"], "server-cert.pem: no such file"),
])
def test_tls_configuration_errors_are_one_line(tmp_path: Path, args: list[str],
                                               message: str) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    p = run([sys.executable, "-m", "nbdluks", "serve", "--raw", str(img),
             "-k", str(tmp_path / "s.sock"), *args], check=False)
    assert p.returncode == 2
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_key_that_does_not_match_the_certificate(tmp_path: Path, pki: dict) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(pki["server"], bad)
    _write_key(ec.generate_private_key(ec.SECP256R1()), bad / "server-key.pem")
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    p = run([sys.executable, "-m", "nbdluks", "serve", "--raw", str(img), "-k",
             str(tmp_path / "s.sock"), "--tls", "on", "--tls-certificates", str(bad)],
            check=False)
    assert p.returncode == 2 and "cannot use" in p.stderr
    assert "PRIVATE KEY" not in p.stderr


def _nbdkit_tls(tmp_path: Path, name: str, pki_dir: Path, export: Path, *extra: str,
                port: int | None = None) -> subprocess.Popen[bytes]:
    sock = tmp_path / f"{name}.sock"
    log = tmp_path / f"{name}.log"
    listen = ["-i", "127.0.0.1", "-p", str(port)] if port else ["-U", str(sock)]
    with open(log, "wb") as f:
        p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", *listen, "--tls=require",
                              f"--tls-certificates={pki_dir}", *extra, "file", f"file={export}"],
                             stdout=f, stderr=subprocess.STDOUT)
    wait_listening(p, None if port else str(sock), port, log)
    return p


def test_header_and_payload_from_tls_upstreams(nbdluks: Callable[..., Served], pki: dict,
                                               tmp_path: Path) -> None:
    """The header server lets in only hosts with a client certificate."""
    need("nbdkit", "qemu-img", "nbdcopy")
    made, plain = volume(tmp_path, detached=True, size=4 * MiB)
    assert made.header
    port = free_port()
    procs = [
        _nbdkit_tls(tmp_path, "hdr", pki["server"], made.header, "--tls-verify-peer",
                    "--readonly"),
        _nbdkit_tls(tmp_path, "pay", pki["server"], made.payload, port=port),
    ]
    try:
        hdr = f"nbds+unix:///?socket={tmp_path / 'hdr.sock'}&tls-certificates={pki['client']}"
        pay = f"nbds://localhost:{port}/?tls-certificates={pki['anon']}"
        srv = nbdluks(*luks_args(made, tmp_path, header=hdr, payload=pay))
        compare(srv.uri, plain, tmp_path)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x6e 512k 64k", srv.uri])
        assert read_plain(made, 65536, at=512 * 1024) == b"\x6e" * 65536
        assert srv.stop() == 0
        # without a client certificate the header stays out of reach
        anon = f"nbds+unix:///?socket={tmp_path / 'hdr.sock'}&tls-certificates={pki['anon']}"
        p = run([sys.executable, "-m", "nbdluks", "serve",
                 *luks_args(made, tmp_path, header=anon, payload=pay),
                 "-k", str(tmp_path / "no.sock")], check=False)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1
        assert "hdr.sock" in p.stderr and "client certificate" in p.stderr, p.stderr
        # and a server whose certificate the CA did not sign is refused
        other = tmp_path / "other-ca"
        other.mkdir()
        _, other_ca = _issue(None, _name("another CA"), "another CA",  # type: ignore[arg-type]
                             ca=True)
        (other / "ca-cert.pem").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
        p = run([sys.executable, "-m", "nbdluks", "inspect",
                 f"nbds://localhost:{port}/?tls-certificates={other}"], check=False)
        assert p.returncode != 0 and "certificate is not trusted" in p.stderr
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_unusable_client_certificates_are_a_one_line_error(tmp_path: Path, pki: dict) -> None:
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(pki["client"] / "ca-cert.pem", half)
    shutil.copy(pki["client"] / "client-cert.pem", half)  # and no client-key.pem
    need("nbdkit")
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    kit = _nbdkit_tls(tmp_path, "k", pki["server"], img)
    try:
        p = run([sys.executable, "-m", "nbdluks", "inspect",
                 f"nbds+unix:///?socket={tmp_path / 'k.sock'}&tls-certificates={half}"],
                check=False)
    finally:
        kit.kill()
        kit.wait()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "cannot use the certificates" in p.stderr and len(p.stderr.splitlines()) == 1


def test_sighup_reloads_the_certificates(nbdluks: Callable[..., Served], pki: dict,
                                         disk: tuple[Path, bytes], tmp_path: Path) -> None:
    need("nbdinfo")
    img, _ = disk
    certs = tmp_path / "certs"
    shutil.copytree(pki["server"], certs)
    srv = nbdluks("--raw", str(img), "--tls", "require", "--tls-certificates", str(certs),
                  tcp=True, unix=False)
    assert "4194304" in run(["nbdinfo", "--size", nbds(srv, pki["anon"])]).stdout
    (tmp_path / "rotated").mkdir()
    rotated = make_pki(tmp_path / "rotated", "rotated CA")
    for name in ("server-cert.pem", "server-key.pem", "ca-cert.pem"):
        shutil.copy(rotated["server"] / name, certs / name)
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS certificates reloaded" not in srv.log_text():
        assert time.monotonic() < deadline and srv.proc.poll() is None
        time.sleep(0.05)
    # new connections get the new certificate: the old CA no longer trusts it
    assert "4194304" in run(["nbdinfo", "--size", nbds(srv, rotated["anon"])]).stdout
    assert run(["nbdinfo", nbds(srv, pki["anon"])], check=False).returncode != 0
    # unusable files: the running certificates stay
    (certs / "server-key.pem").write_text("not a key")
    srv.proc.send_signal(signal.SIGHUP)
    while "TLS certificates not reloaded" not in srv.log_text():
        assert time.monotonic() < deadline + 10 and srv.proc.poll() is None
        time.sleep(0.05)
    assert "4194304" in run(["nbdinfo", "--size", nbds(srv, rotated["anon"])]).stdout
    assert srv.stop() == 0


def test_probe_over_tls(nbdluks: Callable[..., Served], pki: dict,
                        disk: tuple[Path, bytes], tmp_path: Path) -> None:
    img, _ = disk
    srv = nbdluks("--raw", str(img), "--tls", "require", "--tls-certificates",
                  str(pki["server"]), tcp=True, unix=False)
    probe = [sys.executable, "-m", "nbdluks", "probe", "--read"]
    up = run([*probe, nbds(srv, pki["anon"])])
    assert up.stdout.startswith("up: nbds://") and "read=4096" in up.stdout
    down = run([*probe, srv.tcp_uri], check=False)  # in the clear: refused
    assert down.returncode == 1 and down.stdout.startswith("down:")
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = make_pki(other_root, "another CA")  # a CA that did not sign the server
    untrusted = run([*probe, nbds(srv, other["anon"])], check=False)
    assert untrusted.returncode == 1 and "not trusted" in untrusted.stdout
