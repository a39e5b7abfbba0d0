"""Command line: `nbdluks serve` and `nbdluks inspect`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import structlog

from . import __version__
from . import log as logsetup
from .block.base import BlockDevice
from .block.source import SourceError, open_source
from .inspect import describe, render_text
from .luks.errors import LuksError, WrongKeyError
from .luks.luks2 import DEFAULT_ARGON2_MAX_KIB
from .nbd.constants import DEFAULT_PORT
from .nbd.server import Export, Listen, NbdServer
from .opener import KeySource, open_luks, read_header, unlock
from .secrets import SecretError

log = structlog.get_logger("nbdluks")


class UsageError(Exception):
    """A one-line error for the user; exit status 2."""


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
    g.add_argument("--workers", type=int, default=16, help="I/O worker threads (default 16)")


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
    src.add_argument("--allow-discards", action="store_true",
                     help="pass TRIM on to the payload (discarded ranges read back as "
                     "unpredictable data)")
    _key_args(serve)
    _listen_args(serve)
    _log_args(serve)

    insp = sub.add_parser("inspect", help="show a LUKS header (and test a key)")
    insp.add_argument("source", metavar="SRC", help="header or volume: file or block device")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    _key_args(insp)
    _log_args(insp)
    return parser


def open_device(args: argparse.Namespace) -> BlockDevice:
    if args.raw:
        if args.payload or args.header:
            raise UsageError("--raw cannot be combined with --payload/--header")
        return open_source(args.raw, read_only=args.read_only)
    if not args.payload:
        raise UsageError("nothing to serve: give --payload SRC (LUKS) or --raw SRC")
    keys = _keys(args)
    if not keys.given():
        raise UsageError(
            "give one of --passphrase-file, --key-file or --volume-key-file"
        )
    dev, vol, slot = open_luks(
        args.payload, args.header, keys, read_only=args.read_only,
        allow_discards=args.allow_discards, argon2_max_kib=args.argon2_max_memory,
    )
    log.info(
        "volume unlocked", luks_version=vol.version, uuid=vol.uuid,
        cipher=vol.segment.cipher, sector_size=vol.segment.sector_size,
        keyslot=slot, size=dev.size, header_copy=vol.copy,
    )
    return dev


def inspect(args: argparse.Namespace) -> int:
    hdr = open_source(args.source, read_only=True)
    with hdr:
        try:
            vol, prefix = read_header(hdr, args.argon2_max_memory)
        except LuksError as e:
            raise type(e)(f"{args.source}: {e}") from None
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


async def serve(args: argparse.Namespace, device: BlockDevice) -> int:
    export = Export(args.export_name, device, args.description, args.read_only)
    server = NbdServer(
        [export], max_inflight=args.max_inflight * 1024 * 1024, workers=args.workers
    )
    listens = []
    if args.socket:
        listens.append(Listen(socket_path=args.socket))
    if args.bind or args.port is not None or not args.socket:
        listens.append(Listen(host=args.bind or "127.0.0.1", port=args.port or DEFAULT_PORT))
    for where in listens:
        try:
            addrs = await server.listen(where)
        except OSError as e:
            raise UsageError(f"cannot listen on {where}: {e.strerror}") from None
        log.info("listening", addresses=addrs, export=args.export_name, size=device.size)
    await server.serve_until_stopped()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logsetup.setup(args.log_format, args.log_level)
    try:
        if args.command == "inspect":
            return inspect(args)
        device = open_device(args)
        with device:
            return _run(serve(args, device))
    except UsageError as e:
        print(f"nbdluks: {e}", file=sys.stderr)
        return 2
    except (LuksError, SecretError, SourceError) as e:
        print(f"nbdluks: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"nbdluks: {e.filename or 'I/O'}: {e.strerror}", file=sys.stderr)
        return 1


def _run(coro: object) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))  # type: ignore[arg-type]
    except ImportError:
        return int(asyncio.run(coro))  # type: ignore[arg-type]
