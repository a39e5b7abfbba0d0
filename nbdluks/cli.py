"""Command line: `nbdluks serve` and `nbdluks inspect`.

The options objects are built here, once, from the parsed arguments; every
default is the options class's own (the help texts show it)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
from collections.abc import Sequence

import structlog

from . import __version__, readiness, serving, signals
from . import log as logsetup
from .dump import describe, render_text
from .errors import NbdluksError
from .hardening import harden_process
from .luks.errors import Argon2MemoryError, LuksError, WrongKeyError
from .nbd.constants import DEFAULT_PORT
from .nbd.handshake import TlsMode
from .nbd.listen import Listen, activated, address, bind, cleanup
from .nbd.options import MiB, ServerOptions
from .nbd.tls import ServerCredentials, TlsConfigError, TlsFileMissingError
from .nbd.upstream import UpstreamOptions
from .nbd.uri import UriError, parse_uri
from .opener import (
    NewlineKeyError,
    Opened,
    UnlockOptions,
    VolumeOptions,
    open_raw,
    read_header,
    unlock,
    unlock_volume,
)
from .probe import probe
from .secrets import MAX_KEYFILE, KeyFileShortError
from .serving import ServeOptions
from .source import SourceError, is_nbd_uri, open_source

log = structlog.get_logger("nbdluks")

_SERVER = ServerOptions()
_UPSTREAM = UpstreamOptions()
_UNLOCK = UnlockOptions()
# Worker processes by default: one per CPU, up to this many.
_MAX_DEFAULT_PROCESSES = 8


class UsageError(NbdluksError):
    """A one-line error for the user; exit status 2."""


def hint(e: Exception) -> str:
    """Lower layers never name our flags: the flag that would help, if any."""
    if isinstance(e, Argon2MemoryError):
        return " (raise --argon2-max-memory if you trust the header)"
    if isinstance(e, KeyFileShortError):
        return " (see --keyfile-size)"
    if isinstance(e, TlsFileMissingError):
        return " (see --tls-certificates)"
    if isinstance(e, NewlineKeyError):
        if e.kept:
            return (" (the key file ends in a newline, which --key-file keeps as part of "
                    "the key: for a passphrase typed into a file, try --passphrase-file)")
        return (" (--passphrase-file drops the newline that ends the file's line: for a "
                "volume made with cryptsetup --key-file on this file, use --key-file)")
    return ""


def _source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sources (a path to a file or block device, or an NBD URI)")
    g.add_argument("--payload", metavar="SRC", help="the encrypted payload")
    g.add_argument("--header", metavar="SRC",
                   help="a detached LUKS header (default: at the start of the payload)")
    g.add_argument("--raw", metavar="SRC", help="serve a file or block device as it is")
    g.add_argument("--upstream-timeout", type=float, default=_UPSTREAM.timeout, metavar="S",
                   help="seconds an upstream NBD server may take to answer before its "
                   "connection counts as dead and requests fail with EIO "
                   f"(default {_UPSTREAM.timeout:.0f})")
    g.add_argument("--upstream-reconnect", type=float, default=_UPSTREAM.reconnect,
                   metavar="S", help="when an upstream NBD connection dies, keep trying to "
                   "connect again for S seconds and send its requests again (default "
                   f"{_UPSTREAM.reconnect:.0f}: fail them with EIO)")
    g.add_argument("--allow-discards", action="store_true",
                   help="pass TRIM on to the payload (discarded ranges read back as "
                   "unpredictable data)")


def _listen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("listening")
    g.add_argument("-k", "--socket", metavar="PATH", help="listen on a unix socket")
    g.add_argument("-b", "--bind", metavar="ADDR", help="TCP address (default 127.0.0.1)")
    g.add_argument("-p", "--port", type=int, help=f"TCP port (default {DEFAULT_PORT})")
    g.add_argument("-x", "--export-name", default="", metavar="NAME",
                   help='export name (default "")')
    g.add_argument("-D", "--description", default="", help="export description")
    g.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    g.add_argument("--print-uri", action="store_true",
                   help="once listening, print each listener's NBD URI on stdout")
    g.add_argument("--pid-file", metavar="F",
                   help="write the server's pid to F once listening (removed at exit)")
    g.add_argument("--max-inflight", type=int, default=_SERVER.max_inflight // MiB,
                   metavar="MiB", help="bytes in flight per connection before reading "
                   f"pauses (default {_SERVER.max_inflight // MiB})")
    g.add_argument("--max-memory", type=int, default=_SERVER.max_memory // MiB, metavar="MiB",
                   help="request data held at once by the whole server before reading "
                   f"pauses on every connection (default {_SERVER.max_memory // MiB})")
    g.add_argument("--max-connections", type=int, default=_SERVER.max_connections,
                   metavar="N", help="clients served at once; more are refused (default "
                   f"{_SERVER.max_connections}; each process takes an equal share)")
    g.add_argument("--handshake-limit", type=float, default=_SERVER.handshake_timeout,
                   metavar="S", help="seconds a client may take to negotiate (default "
                   f"{_SERVER.handshake_timeout:.0f}); silent connections are closed after it")
    g.add_argument("--threads", type=int, default=_SERVER.threads,
                   help=f"I/O threads per process (default {_SERVER.threads})")
    g.add_argument("--processes", type=int, default=None, metavar="N",
                   help="worker processes sharing the listeners (default: one per CPU, "
                   f"at most {_MAX_DEFAULT_PROCESSES}; 1 = no extra processes)")


def _tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (clients use nbds:// URIs)")
    g.add_argument("--tls", choices=[m.value for m in TlsMode], default=_SERVER.tls.value,
                   help="off: refuse STARTTLS; on: the client chooses; require: nothing "
                   f"but TLS (default {_SERVER.tls.value})")
    g.add_argument("--tls-certificates", metavar="DIR",
                   help="server-cert.pem and server-key.pem (and ca-cert.pem with "
                   "--tls-verify-peer), as qemu-nbd and nbdkit take them")
    g.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by DIR/ca-cert.pem")


def _log_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging (structlog on stderr; secrets never appear)")
    g.add_argument("--log-format", choices=("auto", "console", "json"), default="auto",
                   help="auto: console on a terminal, JSON otherwise (default auto)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info", help="default info")


def _key_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unlocking (secrets come from files: a path, /dev/fd/N or -)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--passphrase-file", metavar="F",
                   help="passphrase: the file's first line, without its newline")
    x.add_argument("--key-file", metavar="F", help="key file: its bytes, exactly")
    x.add_argument("--volume-key-file", metavar="F",
                   help="the volume key itself (checked against the header's digest)")
    g.add_argument("--keyfile-offset", type=int, default=_UNLOCK.keyfile_offset, metavar="N",
                   help="skip N bytes of the key file")
    g.add_argument("--keyfile-size", type=int, metavar="N", help="read N bytes of the key file")
    g.add_argument("--key-slot", type=int, metavar="N", help="try this key slot only")
    g.add_argument("--argon2-max-memory", type=int, default=_UNLOCK.argon2_max_kib,
                   metavar="KiB", help="refuse Argon2 slots that need more memory "
                   f"(default {_UNLOCK.argon2_max_kib} KiB)")


_SERVE_EPILOG = """\
sources: a file or block device path, or an NBD URI: nbd://HOST[:PORT]/EXPORT,
  nbd+unix:///EXPORT?socket=PATH, and over TLS nbds://... or nbds+unix://...
  with tls-certificates=DIR, tls-verify-peer=false, tls-hostname=NAME.
signals: SIGTERM/SIGINT drain and exit; SIGHUP re-reads the TLS certificates.
exit status: 0 stopped cleanly (or by a signal before serving), 1 a runtime
  failure (wrong key, unusable header or source, final flush failed),
  2 a usage error (a flag value that cannot work).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdluks", description="Serve the decrypted contents of a LUKS volume over NBD."
    )
    parser.add_argument("--version", action="version", version=f"nbdluks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="serve a volume over NBD", epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _source_args(serve)
    _key_args(serve)
    _listen_args(serve)
    _tls_args(serve)
    _log_args(serve)

    prb = sub.add_parser("probe", help="check that an NBD export serves (exit 0) or not (1)")
    prb.add_argument("uri", metavar="URI", help="nbd://, nbd+unix://, nbds://, nbds+unix://")
    prb.add_argument("--read", action="store_true", help="also read the first block")
    prb.add_argument("--timeout", type=float, default=5.0, metavar="S",
                     help="seconds for the connection and for each answer (default 5)")
    _log_args(prb)

    insp = sub.add_parser("inspect", help="show a LUKS header (and test a key)")
    insp.add_argument("source", metavar="SRC", help="header or volume: file or block device")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    _key_args(insp)
    _log_args(insp)
    return parser


# --- options objects, built once ----------------------------------------------


def unlock_options(args: argparse.Namespace) -> UnlockOptions:
    return UnlockOptions(
        passphrase_file=args.passphrase_file, key_file=args.key_file,
        keyfile_offset=args.keyfile_offset, keyfile_size=args.keyfile_size,
        volume_key_file=args.volume_key_file, key_slot=args.key_slot,
        argon2_max_kib=args.argon2_max_memory,
    )


def volume_options(args: argparse.Namespace) -> VolumeOptions:
    return VolumeOptions(
        read_only=args.read_only, allow_discards=args.allow_discards,
        upstream=UpstreamOptions(timeout=args.upstream_timeout,
                                 reconnect=args.upstream_reconnect),
    )


def server_options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        max_connections=args.max_connections, max_inflight=args.max_inflight * MiB,
        max_memory=args.max_memory * MiB,
        threads=args.threads, tls=TlsMode(args.tls), credentials=tls_credentials(args),
        handshake_timeout=args.handshake_limit,
    )


def tls_credentials(args: argparse.Namespace) -> ServerCredentials | None:
    if args.tls == TlsMode.OFF.value:
        if args.tls_certificates or args.tls_verify_peer:
            raise UsageError("--tls-certificates/--tls-verify-peer need --tls on or require")
        return None
    if not args.tls_certificates:
        raise UsageError(f"--tls {args.tls} needs --tls-certificates DIR")
    try:
        return ServerCredentials(args.tls_certificates, args.tls_verify_peer)
    except TlsConfigError as e:
        raise UsageError(f"{e}{hint(e)}") from None


# --- checks before anything is unlocked ------------------------------------------

# dest: (smallest, largest or None, the flag's name)
_INT_RANGES: dict[str, tuple[int, int | None, str]] = {
    "port": (1, 65535, "-p/--port"),
    "processes": (1, 256, "--processes"),
    "max_inflight": (1, 1 << 20, "--max-inflight"),
    "max_connections": (1, 1 << 20, "--max-connections"),
    "max_memory": (16, 1 << 30, "--max-memory"),
    "threads": (1, 1024, "--threads"),
    "keyfile_offset": (0, None, "--keyfile-offset"),
    "keyfile_size": (1, MAX_KEYFILE, "--keyfile-size"),
    "key_slot": (0, 31, "--key-slot"),
    "argon2_max_memory": (8, None, "--argon2-max-memory"),
}
# The longest unix socket path (sun_path, with its terminating NUL).
_MAX_SOCKET_PATH = 107


def check_args(args: argparse.Namespace) -> None:
    """Flag values that cannot work: refused before the unlock (exit 2)."""
    for dest, (lo, hi, flag) in _INT_RANGES.items():
        value = getattr(args, dest, None)
        if value is not None and (value < lo or (hi is not None and value > hi)):
            allowed = f"at least {lo}" if hi is None else f"{lo}..{hi}"
            raise UsageError(f"{flag} {value}: must be {allowed}")
    if getattr(args, "upstream_timeout", 1) <= 0:
        raise UsageError("--upstream-timeout must be more than 0 seconds")
    if getattr(args, "handshake_limit", 1) <= 0:
        raise UsageError("--handshake-limit must be more than 0 seconds")
    if getattr(args, "upstream_reconnect", 0) < 0:
        raise UsageError("--upstream-reconnect cannot be negative")
    if args.command == "serve" and args.socket:
        n = len(os.fsencode(args.socket))
        if n > _MAX_SOCKET_PATH:
            raise UsageError(f"-k/--socket: the path is {n} bytes long, at most "
                             f"{_MAX_SOCKET_PATH} fit in a unix socket address")
    for flag in ("payload", "header", "raw"):
        spec = getattr(args, flag, None)
        if spec and is_nbd_uri(spec):
            _check_uri(spec)


def _check_uri(spec: str) -> None:
    try:
        uri = parse_uri(spec)
    except UriError as e:
        raise UsageError(str(e)) from None
    if uri.tls_certificates and not os.path.isdir(uri.tls_certificates):
        raise UsageError(f"{spec}: tls-certificates={uri.tls_certificates}: no such directory")


# --- serve ------------------------------------------------------------------------


def open_served(args: argparse.Namespace) -> Opened:
    """Open and check what is served (unlocking a LUKS volume) before
    anything listens."""
    options = volume_options(args)
    if args.raw:
        if args.payload or args.header:
            raise UsageError("--raw cannot be combined with --payload/--header")
        opened = open_raw(args.raw, options)
        log.info("source opened", **opened.log_fields())
        return opened
    if not args.payload:
        raise UsageError("nothing to serve: give --payload SRC (LUKS) or --raw SRC")
    keys = unlock_options(args)
    if not keys.given():
        raise UsageError("give one of --passphrase-file, --key-file or --volume-key-file")
    opened = unlock_volume(args.payload, args.header, keys, options)
    log.info("volume unlocked", **opened.log_fields())
    return opened


def process_count(args: argparse.Namespace, opened: Opened) -> int:
    if not opened.multi_process:
        # One upstream connection per process: a FLUSH on one would not
        # cover another's writes unless the upstream promises multi-conn.
        return 1
    return args.processes or min(os.cpu_count() or 1, _MAX_DEFAULT_PROCESSES)


def bind_listeners(args: argparse.Namespace) -> list[socket.socket]:
    socks: list[socket.socket]
    try:
        socks = activated()
    except OSError as e:
        raise UsageError(f"socket activation: {e}") from None
    if socks:
        if args.socket or args.bind or args.port is not None:
            raise UsageError("socket activation (LISTEN_FDS) excludes -k, -b and -p")
        return socks
    listens = []
    if args.socket:
        listens.append(Listen(socket_path=args.socket))
    if args.bind or args.port is not None or not args.socket:
        listens.append(Listen(host=args.bind or "127.0.0.1", port=args.port or DEFAULT_PORT))
    for where in listens:
        try:
            socks += bind(where)
        except OSError as e:
            cleanup(socks)
            raise UsageError(f"cannot listen on {where}: {e.strerror}") from None
    return socks


def serve(args: argparse.Namespace) -> int:
    check_args(args)
    server = server_options(args)
    opened = open_served(args)
    try:
        opts = ServeOptions(server=server, export_name=args.export_name,
                            description=args.description, read_only=args.read_only,
                            processes=process_count(args, opened))
        socks = bind_listeners(args)
    except BaseException:
        opened.wipe()
        raise
    try:
        announce(args, socks, opts)
        return serving.serve(opened, socks, opts)
    finally:
        if args.pid_file:
            readiness.remove_pid_file(args.pid_file)
        cleanup(socks)


def _loopback(sock: socket.socket) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def announce(args: argparse.Namespace, socks: list[socket.socket], opts: ServeOptions) -> None:
    """Listening, with the key unlocked: say so, to people and to supervisors.
    (Connections made now wait in the listen queue until a worker takes them.)"""
    log.info("listening", addresses=[address(s) for s in socks], export=args.export_name,
             processes=opts.processes, tls=args.tls)
    exposed = [address(s) for s in socks if not _loopback(s)]
    if exposed and opts.server.tls is not TlsMode.REQUIRE:
        log.warning("serving the decrypted volume in plaintext beyond this host",
                    addresses=exposed, tls=args.tls)
    if args.print_uri:
        tls = opts.server.tls is TlsMode.REQUIRE
        print("\n".join(readiness.uris(socks, args.export_name, tls)), flush=True)
    if args.pid_file:
        readiness.write_pid_file(args.pid_file)
    readiness.notify("READY=1", f"MAINPID={os.getpid()}",
                     f"STATUS=serving export {args.export_name!r} on "
                     + ", ".join(address(s) for s in socks))


def probe_command(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    try:
        uri = parse_uri(args.uri)
    except UriError as e:
        raise UsageError(str(e)) from None
    ok, line = probe(uri, read=args.read, timeout=args.timeout)
    print(line)
    return 0 if ok else 1


# --- inspect ----------------------------------------------------------------------


def inspect(args: argparse.Namespace) -> int:
    check_args(args)
    hdr = open_source(args.source, read_only=True)
    keys = unlock_options(args)
    with hdr:
        try:
            vol, prefix = read_header(hdr, keys.argon2_max_kib)
        except LuksError as e:
            raise SourceError(f"{args.source}: {e}{hint(e)}") from None
        info = describe(vol)
        status = 0
        if keys.given():
            try:
                unlocked = unlock(vol, hdr, prefix, keys)
                unlocked.wipe()
                info["key_check"] = {"ok": True, "keyslot": unlocked.keyslot}
            except WrongKeyError as e:
                info["key_check"] = {"ok": False, "reason": f"{e}{hint(e)}"}
                status = 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_text(info))
        check = info.get("key_check")
        if check is not None:
            if check["ok"]:
                slot = check["keyslot"]
                print("Key OK" + (f": key slot {slot} opened" if slot is not None
                                  else ": volume key matches"))
            else:
                print(f"Key FAILED: {check['reason']}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    signals.on_startup()  # again: main may be called without nbdluks.entry
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.setup(args.log_format, args.log_level)
    log.debug("process hardened", **harden_process())
    try:
        if args.command == "inspect":
            return inspect(args)
        if args.command == "probe":
            return probe_command(args)
        return serve(args)
    except signals.Stopped as e:
        log.info("stopped before serving", signal=e.name)
        return 0
    except UsageError as e:
        logsetup.fatal(str(e), 2)
        return 2
    except NbdluksError as e:
        logsetup.fatal(f"{e}{hint(e)}", 1)
        return 1
    except OSError as e:
        logsetup.fatal(f"{e.filename or 'I/O'}: {e.strerror}", 1)
        return 1
