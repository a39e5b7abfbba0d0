"""Command line: `nbdluks serve`, `inspect` and `probe`. Parse, build the
options (options.py), call the layer that does the work, and turn its
errors into one line and an exit status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import structlog

from .. import signals
from ..daemon import (
    DaemonOptions,
    Opening,
    Reread,
    Rotator,
    ServeOptions,
    SetupError,
    fatal,
    harden_process,
    raise_open_files_limit,
    run,
    setup_logging,
    usable_cpus,
)
from ..errors import NbdluksError
from ..manage import open_rotating, rotate_beside
from ..nbd import UriError, parse_uri
from ..unlock import VolumeConfig, open_volume
from .arguments import MAX_DEFAULT_PROCESSES, build_parser, explicit_options, serve_parser
from .config import load as load_config
from .inspect import inspect
from .lifecycle import COMMANDS as LIFECYCLE
from .lifecycle import run as run_lifecycle
from .options import (
    UsageError,
    check_args,
    hint,
    listen_options,
    metrics_address,
    run_as_user,
    server_options,
    setup_error,
    volume_config,
)
from .probe import probe

log = structlog.get_logger("nbdluks")

__all__ = ["build_parser", "main"]


def daemon_options(args: argparse.Namespace) -> DaemonOptions:
    server = server_options(args)
    metrics = metrics_address(args.metrics) if args.metrics else None
    run_as = run_as_user(args)
    processes = args.processes or min(usable_cpus(), MAX_DEFAULT_PROCESSES)
    return DaemonOptions(
        serve=ServeOptions(server=server, processes=processes),
        listen=listen_options(args), metrics=metrics, run_as=run_as,
        print_uri=args.print_uri, pid_file=args.pid_file)


def serve(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.config:
        return serve_config(args, argv)
    check_args(args)
    opts = daemon_options(args)  # a wrong value is refused before the unlock
    config = volume_config(args)
    if args.reencrypt:
        return serve_reencrypting(config, opts)
    # One volume opens before anything listens: a wrong key is one line and
    # exit 1, with no socket left behind.
    volume = open_volume(config)
    log.info("volume unlocked" if config.payload else "source opened",
             **volume.log_fields())
    return run_daemon(lambda: ([volume], 0), opts)


def serve_reencrypting(config: VolumeConfig, opts: DaemonOptions) -> int:
    """Serve while the volume key is rotated: the reencryption started (or
    an interrupted step recovered) before anything listens, then moved on by
    a process beside the server's. That process is forked by the rotator's
    helper, itself forked here before anything starts a thread (the unlock,
    an NBD source's connection): a fork of a threaded process may inherit a
    lock that no thread of the child will ever release."""
    if config.payload is None or config.options.read_only:
        raise UsageError("--reencrypt needs a --payload served read-write")
    rotator = Rotator(rotate_beside, open_rotating)
    try:
        volume = rotator.opener(config, None)
        log.info("volume unlocked", **volume.log_fields())
        rotator.start(volume)  # (none when it had finished already)
    except BaseException:
        rotator.close()
        raise
    return run_daemon(lambda: ([volume], 0), opts, rotator=rotator)


def run_daemon(opening: Opening, opts: DaemonOptions, reread: Reread | None = None,
               pending: Sequence[VolumeConfig] = (), rotator: Rotator | None = None) -> int:
    try:
        return run(opening, opts, reread, pending, rotator)
    except SetupError as e:
        raise setup_error(e) from None


def serve_config(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Many exports from a configuration file; SIGHUP reloads it."""
    parser = serve_parser()
    given = explicit_options(argv)
    cfg = load_config(args.config, parser, given)
    opts = daemon_options(cfg.server)
    log.debug("open files limit", soft=raise_open_files_limit())

    def reread() -> tuple[VolumeConfig, ...]:
        new = load_config(cfg.path, parser, given)
        if vars(new.server) != vars(cfg.server):
            log.warning("the [server] table changed: it takes effect at a restart",
                        config=cfg.path)
        return new.exports

    # Listening starts at once; the exports unlock while the workers serve.
    # Their reencryptions are forked by a helper forked now, before any thread.
    rotator = Rotator(rotate_beside, open_rotating)
    return run_daemon(lambda: ([], 0), opts, reread, cfg.exports, rotator)


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


def main(argv: Sequence[str] | None = None) -> int:
    signals.on_startup()  # again: main may be called without nbdluks.entry
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_format, args.log_level)
    log.debug("process hardened", **harden_process())
    try:
        if args.command == "inspect":
            return inspect(args)
        if args.command == "probe":
            return probe_command(args)
        if args.command in LIFECYCLE:
            return run_lifecycle(args)
        return serve(args, sys.argv[1:] if argv is None else argv)
    except signals.Stopped as e:
        if args.command in LIFECYCLE:  # a change cut short is not a success
            fatal(f"{args.command} stopped by {e.name} before it finished", 128 + e.signum)
            return 128 + e.signum
        log.info("stopped before serving", signal=e.name)
        return 0
    except UsageError as e:
        fatal(str(e), 2)
        return 2
    except NbdluksError as e:
        fatal(f"{e}{hint(e)}", 1)
        return 1
    except OSError as e:
        fatal(f"{e.filename or 'I/O'}: {e.strerror}", 1)
        return 1
