"""Command line: `nbdluks serve` and `nbdluks inspect`."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence

import structlog

from . import __version__, serving
from . import log as logsetup
from .block.base import BlockDevice
from .dump import describe, render_text
from .errors import NbdluksError
from .luks.errors import Argon2MemoryError, LuksError, WrongKeyError
from .luks.luks2 import DEFAULT_ARGON2_MAX_KIB
from .nbd.constants import DEFAULT_PORT
from .nbd.handshake import TlsMode
from .nbd.listen import Listen, activated, address, bind, cleanup
from .nbd.tls import TlsConfigError, TlsFileMissingError, server_context
from .opener import KeySource, read_header, unlock, unlock_volume
from .secrets import KeyFileShortError
from .serving import ServeConfig
from .source import (
    DEFAULT_UPSTREAM_TIMEOUT,
    SourceError,
    UpstreamOptions,
    is_nbd_uri,
    open_source,
)

log = structlog.get_logger("nbdluks")


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
    return ""


def _listen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("listening")
    g.add_argument("-k", "--socket", metavar="PATH", help="listen on a unix socket")
    g.add_argument("-b", "--bind", metavar="ADDR", help="TCP address (default 127.0.0.1)")
    g.add_argument("-p", "--port", type=int, help=f"TCP port (default {DEFAULT_PORT})")
    g.add_argument("-x", "--export-name", default="", metavar="NAME",
                   help='export name (default "")')
    g.add_argument("-D", "--description", default="", help="export description")
    g.add_argument("-r", "--read-only", action="store_true", help="refuse writes")
    g.add_argument("--max-inflight", type=int, default=64, metavar="MiB",
                   help="bytes in flight per connection before reading pauses (default 64)")
    g.add_argument("--max-connections", type=int, default=128, metavar="N",
                   help="clients served at once; more are refused (default 128; "
                   "each process takes an equal share)")
    g.add_argument("--threads", type=int, default=8,
                   help="I/O threads per process (default 8)")
    g.add_argument("--processes", type=int, default=None, metavar="N",
                   help="worker processes sharing the listeners (default: one per CPU, "
                   "at most 8; 1 = no extra processes)")


def _tls_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS (clients use nbds:// URIs)")
    g.add_argument("--tls", choices=[m.value for m in TlsMode], default="off",
                   help="off: refuse STARTTLS; on: the client chooses; require: nothing "
                   "but TLS (default off)")
    g.add_argument("--tls-certificates", metavar="DIR",
                   help="server-cert.pem and server-key.pem (and ca-cert.pem with "
                   "--tls-verify-peer), as qemu-nbd and nbdkit take them")
    g.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by DIR/ca-cert.pem")


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls == TlsMode.OFF.value:
        if args.tls_certificates or args.tls_verify_peer:
            raise UsageError("--tls-certificates/--tls-verify-peer need --tls on or require")
        return None
    if not args.tls_certificates:
        raise UsageError(f"--tls {args.tls} needs --tls-certificates DIR")
    try:
        return server_context(args.tls_certificates, args.tls_verify_peer)
    except TlsConfigError as e:
        raise UsageError(f"{e}{hint(e)}") from None


def _log_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def _key_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unlocking (secrets come from files: a path, /dev/fd/N or -)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--passphrase-file", metavar="F",
                   help="passphrase: the file's first line, without its newline")
    x.add_argument("--key-file", metavar="F", help="key file: its bytes, exactly")
    x.add_argument("--volume-key-file", metavar="F",
                   help="the volume key itself (checked against the header's digest)")
    g.add_argument("--keyfile-offset", type=int, default=0, metavar="N",
                   help="skip N bytes of the key file")
    g.add_argument("--keyfile-size", type=int, metavar="N", help="read N bytes of the key file")
    g.add_argument("--key-slot", type=int, metavar="N", help="try this key slot only")
    g.add_argument("--argon2-max-memory", type=int, default=DEFAULT_ARGON2_MAX_KIB,
                   metavar="KiB", help="refuse Argon2 slots that need more memory "
                   f"(default {DEFAULT_ARGON2_MAX_KIB} KiB = 4 GiB)")


def _keys(args: argparse.Namespace) -> KeySource:
    return KeySource(
        passphrase_file=args.passphrase_file, key_file=args.key_file,
        keyfile_offset=args.keyfile_offset, keyfile_size=args.keyfile_size,
        volume_key_file=args.volume_key_file, key_slot=args.key_slot,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdluks", description="Serve the decrypted contents of a LUKS volume over NBD."
    )
    parser.add_argument("--version", action="version", version=f"nbdluks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a volume over NBD")
    src = serve.add_argument_group("sources (a path to a file or block device)")
    src.add_argument("--payload", metavar="SRC", help="the encrypted payload")
    src.add_argument("--header", metavar="SRC",
                     help="a detached LUKS header (default: at the start of the payload)")
    src.add_argument("--raw", metavar="SRC", help="serve a file or block device as it is")
    src.add_argument("--upstream-timeout", type=float, default=DEFAULT_UPSTREAM_TIMEOUT,
                     metavar="S", help="seconds an upstream NBD server may take to answer "
                     "before its connection counts as dead and requests fail with EIO "
                     f"(default {DEFAULT_UPSTREAM_TIMEOUT:.0f})")
    src.add_argument("--upstream-reconnect", type=float, default=0.0, metavar="S",
                     help="when an upstream NBD connection dies, keep trying to connect "
                     "again for S seconds and send its requests again (default 0: fail them "
                     "with EIO)")
    src.add_argument("--allow-discards", action="store_true",
                     help="pass TRIM on to the payload (discarded ranges read back as "
                     "unpredictable data)")
    _key_args(serve)
    _listen_args(serve)
    _tls_args(serve)
    _log_args(serve)

    insp = sub.add_parser("inspect", help="show a LUKS header (and test a key)")
    insp.add_argument("source", metavar="SRC", help="header or volume: file or block device")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    _key_args(insp)
    _log_args(insp)
    return parser


def prepare(args: argparse.Namespace) -> tuple[Callable[[], BlockDevice], int]:
    """Open and check the sources (unlocking a LUKS volume) before anything
    listens; return a factory of devices for the worker processes and how
    many processes to run."""
    uv = None
    reopen: Callable[[], BlockDevice]
    upstream = UpstreamOptions(args.upstream_timeout, args.upstream_reconnect)
    if args.raw:
        if args.payload or args.header:
            raise UsageError("--raw cannot be combined with --payload/--header")
        source = args.raw
        first: BlockDevice = open_source(source, read_only=args.read_only, upstream=upstream)

        def reopen() -> BlockDevice:
            return open_source(source, read_only=args.read_only, upstream=upstream)
    else:
        if not args.payload:
            raise UsageError("nothing to serve: give --payload SRC (LUKS) or --raw SRC")
        keys = _keys(args)
        if not keys.given():
            raise UsageError("give one of --passphrase-file, --key-file or --volume-key-file")
        source = args.payload
        uv = unlock_volume(
            args.payload, args.header, keys, read_only=args.read_only,
            allow_discards=args.allow_discards, argon2_max_kib=args.argon2_max_memory,
            upstream=upstream,
        )
        try:
            first = uv.device()
        except BaseException:
            uv.wipe()
            raise
        vol = uv.vol
        log.info(
            "volume unlocked", luks_version=vol.version, uuid=vol.uuid,
            cipher=vol.segment.cipher, sector_size=vol.segment.sector_size,
            keyslot=uv.keyslot, size=first.size, header_copy=vol.copy,
            cipher_engine=first.cipher.engine,
        )
        # Partial-sector writes from different processes take turns.
        lock = multiprocessing.get_context("fork").Lock()
        unlocked = uv

        def reopen() -> BlockDevice:
            return unlocked.device(rmw_lock=lock)

    processes = args.processes or min(os.cpu_count() or 1, 8)
    if is_nbd_uri(source) and not _upstream_multi_conn(first):
        # One upstream connection per process: a FLUSH on one would not
        # cover another's writes unless the upstream promises multi-conn.
        processes = 1
    if processes <= 1:
        if uv is not None:
            uv.wipe()
        return (lambda: first), 1
    first.close()
    return reopen, processes


def _upstream_multi_conn(dev: BlockDevice) -> bool:
    from .nbd.constants import TxFlag
    from .nbd.upstream import NbdDevice

    payload = getattr(dev, "payload", dev)
    return isinstance(payload, NbdDevice) and bool(payload.client.flags & TxFlag.CAN_MULTI_CONN)


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
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    ssl_context = tls_context(args)
    make_device, processes = prepare(args)
    socks = bind_listeners(args)
    try:
        log.info("listening", addresses=[address(s) for s in socks], export=args.export_name,
                 processes=processes, tls=args.tls)
        cfg = ServeConfig(
            export_name=args.export_name, description=args.description,
            read_only=args.read_only, max_inflight=args.max_inflight * 1024 * 1024,
            threads=args.threads, processes=processes,
            tls=TlsMode(args.tls), ssl_context=ssl_context,
            max_connections=args.max_connections,
        )
        return serving.serve(make_device, socks, cfg)
    finally:
        cleanup(socks)


def inspect(args: argparse.Namespace) -> int:
    hdr = open_source(args.source, read_only=True)
    with hdr:
        try:
            vol, prefix = read_header(hdr, args.argon2_max_memory)
        except LuksError as e:
            raise SourceError(f"{args.source}: {e}{hint(e)}") from None
        info = describe(vol)
        keys = _keys(args)
        status = 0
        if keys.given():
            try:
                unlocked = unlock(vol, hdr, prefix, keys)
                unlocked.wipe()
                info["key_check"] = {"ok": True, "keyslot": unlocked.keyslot}
            except WrongKeyError as e:
                info["key_check"] = {"ok": False, "reason": str(e)}
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
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.setup(args.log_format, args.log_level)
    try:
        if args.command == "inspect":
            return inspect(args)
        return serve(args)
    except UsageError as e:
        print(f"nbdluks: {e}", file=sys.stderr)
        return 2
    except NbdluksError as e:
        print(f"nbdluks: {e}{hint(e)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nbdluks: {e.filename or 'I/O'}: {e.strerror}", file=sys.stderr)
        return 1
