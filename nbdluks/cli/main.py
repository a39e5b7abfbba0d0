"""Command line: `nbdluks serve`, `inspect` and `probe`.

The options objects are built here, once, from the parsed arguments (see
arguments.py); lower layers' errors get the flag that would help."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
from collections.abc import Sequence

import structlog

from .. import signals
from ..daemon import log as logsetup
from ..daemon import readiness, serving
from ..daemon.cpus import usable_cpus
from ..daemon.hardening import PrivilegeError, drop_privileges, harden_process, resolve_user
from ..daemon.serving import ServeOptions
from ..errors import NbdluksError
from ..luks.errors import Argon2MemoryError
from ..luks.unlock import SlotsSkippedError
from ..nbd.constants import DEFAULT_PORT
from ..nbd.handshake import TlsMode
from ..nbd.listen import Listen, activated, address, bind, cleanup
from ..nbd.options import MiB, ServerOptions
from ..nbd.tls import ServerCredentials, TlsConfigError, TlsFileMissingError
from ..nbd.upstream import UpstreamOptions
from ..nbd.uri import UriError, parse_uri
from ..unlock.headers import read_copy
from ..unlock.opener import (
    NewlineKeyError,
    Opened,
    UnlockOptions,
    VolumeOptions,
    key_check,
    open_raw,
    unlock_volume,
)
from ..unlock.secrets import MAX_KEYFILE, KeyFileShortError
from ..unlock.sources import SourceError, is_nbd_uri
from ..unlock.tokens import UNLOCKING_TYPES, NoTokenError, TokenOptions
from .arguments import MAX_DEFAULT_PROCESSES, build_parser
from .inspect import copy_info, describe, render_text
from .probe import probe

log = structlog.get_logger("nbdluks")



class UsageError(NbdluksError):
    """A one-line error for the user; exit status 2."""


def hint(e: Exception) -> str:
    """Lower layers never name our flags: the flag that would help, if any."""
    if isinstance(e, Argon2MemoryError) or (isinstance(e, SlotsSkippedError) and any(
            isinstance(s, Argon2MemoryError) for s in e.skipped)):
        return " (raise --argon2-max-memory if you trust the header)"
    if isinstance(e, NoTokenError):
        return " (give --passphrase-file, --key-file or --volume-key-file)"
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


# --- options objects, built once ----------------------------------------------


def unlock_options(args: argparse.Namespace) -> UnlockOptions:
    keys = UnlockOptions(
        passphrase_file=args.passphrase_file, key_file=args.key_file,
        keyfile_offset=args.keyfile_offset, keyfile_size=args.keyfile_size,
        volume_key_file=args.volume_key_file, key_slot=args.key_slot,
        argon2_max_kib=args.argon2_max_memory,
        tokens=TokenOptions(token_id=args.token_id, token_type=args.token_type,
                            timeout=args.tang_timeout),
    )
    if keys.given() and (args.token_only or args.token_id is not None or args.token_type):
        raise UsageError("--token-only/--token-id/--token-type unlock through tokens: "
                         "they exclude --passphrase-file, --key-file and --volume-key-file")
    if args.token_type and args.token_type not in UNLOCKING_TYPES:
        raise UsageError(f"--token-type {args.token_type}: only "
                         f"{', '.join(UNLOCKING_TYPES)} tokens can unlock here")
    if args.tang_timeout <= 0:
        raise UsageError("--tang-timeout must be more than 0 seconds")
    return keys


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
    specs = [getattr(args, "payload", None), getattr(args, "raw", None),
             *(getattr(args, "header", None) or [])]
    for spec in specs:
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
    opened = unlock_volume(args.payload, args.header or [], keys, options)
    log.info("volume unlocked", **opened.log_fields())
    return opened


def process_count(args: argparse.Namespace, opened: Opened) -> int:
    if not opened.multi_process:
        # One upstream connection per process: a FLUSH on one would not
        # cover another's writes unless the upstream promises multi-conn.
        return 1
    return args.processes or min(usable_cpus(), MAX_DEFAULT_PROCESSES)


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


def metrics_address(value: str) -> Listen:
    """--metrics [ADDR:]PORT, ADDR possibly an [IPv6] literal."""
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics {value}: give [ADDR:]PORT with a port of 1..65535")
    return Listen(host=host, port=int(port))


def bind_metrics(args: argparse.Namespace) -> list[socket.socket]:
    if not args.metrics:
        return []
    where = metrics_address(args.metrics)
    try:
        return bind(where)
    except OSError as e:
        raise UsageError(f"--metrics: cannot listen on {where}: {e.strerror}") from None


def run_as_user(args: argparse.Namespace) -> tuple[int, int] | None:
    if not args.user:
        return None
    try:
        uid, gid = resolve_user(args.user)
    except PrivilegeError as e:
        raise UsageError(f"--user {args.user}: {e}") from None
    if os.geteuid() != 0 and (uid, gid) != (os.getuid(), os.getgid()):
        raise UsageError(f"--user {args.user}: switching users needs root")
    return uid, gid


def serve(args: argparse.Namespace) -> int:
    check_args(args)
    server = server_options(args)
    if args.metrics:
        metrics_address(args.metrics)  # a wrong value is refused before the unlock
    run_as = run_as_user(args)
    opened = open_served(args)
    socks: list[socket.socket] = []
    try:
        opts = ServeOptions(server=server, export_name=args.export_name,
                            description=args.description, read_only=args.read_only,
                            processes=process_count(args, opened))
        socks = bind_listeners(args)
        http = bind_metrics(args)
        if run_as is not None and drop_privileges(*run_as):
            log.info("running as", uid=os.getuid(), gid=os.getgid())
    except BaseException:
        cleanup(socks)
        opened.wipe()
        raise
    try:
        announce(args, socks, opts, http)
        return serving.serve(opened, socks, opts, http)
    finally:
        if args.pid_file:
            readiness.remove_pid_file(args.pid_file)
        cleanup(socks + http)


def _loopback(sock: socket.socket) -> bool:
    if sock.family == socket.AF_UNIX:
        return True
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def announce(args: argparse.Namespace, socks: list[socket.socket], opts: ServeOptions,
             http: list[socket.socket]) -> None:
    """Listening, with the key unlocked: say so, to people and to supervisors.
    (Connections made now wait in the listen queue until a worker takes them.)"""
    log.info("listening", addresses=[address(s) for s in socks], export=args.export_name,
             processes=opts.processes, tls=args.tls,
             metrics=[f"http://{address(s)}/metrics" for s in http] or None)
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
    keys = unlock_options(args)
    copies = [read_copy(src, keys.argon2_max_kib, UpstreamOptions()) for src in args.source]
    try:
        valid = [c for c in copies if c.vol is not None]
        if not valid:
            e = copies[0].error
            if len(copies) == 1 and e is not None:
                if isinstance(e, SourceError):
                    raise e
                raise SourceError(f"{copies[0].source}: {e}{hint(e)}")
            raise SourceError("no usable header: " + "; ".join(
                f"{c.source}: {c.problem}" for c in copies))
        first = valid[0]
        assert first.vol is not None
        info = describe(first.vol)
        status = 0
        if len(copies) > 1:
            info["copies"] = [copy_info(c.source, c.vol, c.problem, first.vol) for c in copies]
            if not all(c["ok"] and c["agrees"] for c in info["copies"]):
                status = 1
                valid = [first]  # never unlock through a copy of another volume
        if keys.given() or args.token_only or args.token_id is not None:
            info["key_check"], error = key_check(valid, keys)
            if error is not None:
                info["key_check"]["reason"] += hint(error)
                status = 1
    finally:
        for c in copies:
            c.close()
    print(json.dumps(info, indent=2) if args.json else render_text(info))
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
