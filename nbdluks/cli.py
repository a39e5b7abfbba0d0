"""Command line: `nbdluks serve` and `nbdluks inspect`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import structlog

from . import __version__
from . import log as logsetup
from .block.base import BlockDevice
from .block.file import FileDevice
from .nbd.constants import DEFAULT_PORT
from .nbd.server import Export, Listen, NbdServer

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdluks", description="Serve the decrypted contents of a LUKS volume over NBD."
    )
    parser.add_argument("--version", action="version", version=f"nbdluks {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a volume over NBD")
    src = serve.add_argument_group("source")
    src.add_argument("--raw", metavar="PATH", help="serve a file or block device as it is")
    _listen_args(serve)
    _log_args(serve)
    return parser


def open_device(args: argparse.Namespace) -> BlockDevice:
    if args.raw:
        return FileDevice(args.raw, read_only=args.read_only)
    raise UsageError("nothing to serve: give --raw PATH")


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
        if args.command == "serve":
            try:
                device = open_device(args)
            except OSError as e:
                raise UsageError(f"{e.filename or 'source'}: {e.strerror}") from None
            with device:
                return _run(serve(args, device))
    except UsageError as e:
        print(f"nbdluks: {e}", file=sys.stderr)
        return 2
    return 1


def _run(coro: object) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))  # type: ignore[arg-type]
    except ImportError:
        return int(asyncio.run(coro))  # type: ignore[arg-type]
