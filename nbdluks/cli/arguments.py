"""The command line's arguments: every option with its help text. The
defaults shown are the options classes' own."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from ..luks import C_HELPER, RESILIENCES
from ..manage import ONLINE_HOTZONE, ONLINE_RATE
from ..nbd import DEFAULT_PORT, MiB, ServerOptions, TlsMode, UpstreamOptions
from ..unlock import TokenOptions, UnlockOptions
from .lifecycle import (
    bind_args,
    format_args,
    key_file_args,
    new_key_args,
    pbkdf_args,
    reencrypt_args,
    size_arg,
    unbind_args,
    volume_args,
)

_SERVER = ServerOptions()
_UPSTREAM = UpstreamOptions()
_UNLOCK = UnlockOptions()
_TOKENS = TokenOptions()
# Worker processes by default: one per CPU, up to this many.
MAX_DEFAULT_PROCESSES = 8


def _source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="serve the exports a TOML file lists, one [exports.NAME] table each "
                   "(keys: the long options of a volume, e.g. payload, header, "
                   "passphrase-file), server options in [server]; SIGHUP reloads it")
    g = p.add_argument_group("sources (a path to a file or block device, or an NBD URI)")
    g.add_argument("--payload", metavar="SRC", help="the encrypted payload")
    g.add_argument("--header", metavar="SRC", action="append",
                   help="a detached LUKS header (default: at the start of the payload); "
                   "give it again for copies (e.g. a luksHeaderBackup elsewhere): the first "
                   "that is reachable, valid and opens with the key is used, copies of "
                   "different volumes refuse to start")
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


def _reencrypt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rotating the volume key while it is served (LUKS2)")
    g.add_argument("--reencrypt", action="store_true",
                   help="start the reencryption under a new volume key (or go on with one "
                   "nbdluks or cryptsetup began) in the background, and serve meanwhile; a "
                   "crash at any moment is recovered at the next start")
    g.add_argument("--reencrypt-rate", type=float, default=ONLINE_RATE, metavar="MiB/s",
                   help="at most this many MiB rewritten per second, so that clients keep "
                   f"their speed (default {ONLINE_RATE:g}; 0: no limit)")
    g.add_argument("--resilience", choices=RESILIENCES, default="checksum",
                   help="how a step survives a crash (default checksum; see reencrypt)")
    g.add_argument("--hotzone-size", type=size_arg, default=ONLINE_HOTZONE, metavar="SIZE",
                   help="bytes rewritten per step, during which clients touching them wait "
                   f"(default {ONLINE_HOTZONE >> 20}M)")


def _listen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("listening")
    g.add_argument("-k", "--socket", metavar="PATH", help="listen on a unix socket")
    g.add_argument("--socket-mode", metavar="MODE",
                   help="permissions of the unix socket file, octal, e.g. 660 (default: "
                   "from the umask; with --user the file belongs to that user)")
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
    g.add_argument("--user", metavar="USER[:GROUP]",
                   help="once the sources are open and the listeners bound, run as USER "
                   "(start as root to read files only root may read; as nbdkit -u/-g)")
    g.add_argument("--metrics", metavar="[ADDR:]PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics and a health "
                   "check at /healthz (200 serving, 503 stopping or upstream down); "
                   "ADDR defaults to 127.0.0.1")
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
    g.add_argument("--stall-limit", type=float, default=_SERVER.stall_timeout, metavar="S",
                   help="seconds a client may leave the server waiting on it: a WRITE whose "
                   "data stops coming, or replies it does not read; its connection is closed "
                   f"after it (default {_SERVER.stall_timeout:.0f})")
    g.add_argument("--busy-poll", type=int, default=_SERVER.busy_poll_us, metavar="US",
                   help="microseconds a connection's next request is awaited on the CPU "
                   "after its replies left, while its client answers that quickly (lower "
                   f"latency for more CPU; default {_SERVER.busy_poll_us}, 0 = never)")
    g.add_argument("--threads", type=int, default=_SERVER.threads,
                   help=f"I/O threads per process (default {_SERVER.threads})")
    g.add_argument("--processes", type=int, default=None, metavar="N",
                   help="worker processes sharing the listeners (default: one per CPU, "
                   f"at most {MAX_DEFAULT_PROCESSES}; 1 = no extra processes)")


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
    g.add_argument("--kdf-limit", type=float, default=_UNLOCK.kdf_limit, metavar="S",
                   help="refuse key slots whose KDF would take longer than S seconds here "
                   "(estimated from a quick measurement before it runs; other slots are "
                   f"still tried; default {_UNLOCK.kdf_limit:.0f})")
    g = p.add_argument_group(
        "tokens (with no key option, LUKS2 clevis tokens unlock: Tang servers, "
        "no secret on this host)")
    g.add_argument("--token-only", action="store_true",
                   help="unlock only through tokens (refuses key options)")
    g.add_argument("--token-id", type=int, metavar="N", help="use only token N")
    g.add_argument("--token-type", metavar="TYPE", help="use only tokens of TYPE (clevis)")
    g.add_argument("--tang-timeout", type=float, default=_TOKENS.timeout, metavar="S",
                   help="seconds a whole Tang exchange (lookup, connect, TLS, answer) may take "
                   f"(default {_TOKENS.timeout:.0f})")


_SERVE_EPILOG = """\
sources: a file or block device path, or an NBD URI: nbd://HOST[:PORT]/EXPORT,
  nbd+unix:///EXPORT?socket=PATH, and over TLS nbds://... or nbds+unix://...
  with tls-certificates=DIR, tls-verify-peer=false, tls-hostname=NAME.
signals: SIGTERM/SIGINT drain and exit; SIGHUP re-reads the TLS certificates
  and, with --config, the configuration: added exports are unlocked, removed
  ones closed once their requests are answered, unchanged ones untouched.
exit status: 0 stopped cleanly (or by a signal before serving), 1 a runtime
  failure (wrong key, unusable header or source, final flush failed),
  2 a usage error (a flag value that cannot work).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdluks", description="Serve the decrypted contents of a LUKS volume over NBD."
    )
    parser.add_argument("--version", action="version", version=f"nbdluks {__version__} ("
                        + ("C helper built" if C_HELPER else
                           "pure Python: the C helper was not built here") + ")")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="serve a volume over NBD", epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _source_args(serve)
    _key_args(serve)
    _reencrypt_args(serve)
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
    insp.add_argument("source", metavar="SRC", nargs="+",
                      help="header or volume (path or NBD URI); several: copies of one "
                      "header, compared")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    _key_args(insp)
    _log_args(insp)
    _lifecycle_parsers(sub)
    return parser


def _lifecycle_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = sub.add_parser("format", help="make a new LUKS volume (cryptsetup luksFormat)")
    volume_args(fmt)
    key_file_args(fmt, "first")
    format_args(fmt)
    pbkdf_args(fmt)
    _log_args(fmt)
    for name, what in (("add-key", "add a key slot (luksAddKey)"),
                       ("change-key", "change the passphrase of a key slot (luksChangeKey)")):
        p = sub.add_parser(name, help=what)
        volume_args(p)
        _key_args(p)
        new_key_args(p, slot=name == "add-key")
        pbkdf_args(p)
        _log_args(p)
    for name, what in (("remove-key", "wipe the key slot the key opens (luksRemoveKey)"),
                       ("kill-slot", "wipe a key slot by number (luksKillSlot)")):
        p = sub.add_parser(name, help=what)
        if name == "kill-slot":
            p.add_argument("slot", type=int, metavar="N", help="the key slot to wipe")
        volume_args(p)
        _key_args(p)
        p.add_argument("--force", action="store_true",
                       help="even the last key slot (the data is then lost); kill-slot: "
                       "without a key of another slot")
        _log_args(p)
    bnd = sub.add_parser("bind", help="bind to Tang or sss: a clevis token and its key "
                         "slot (clevis luks bind)")
    bind_args(bnd)
    volume_args(bnd)
    _key_args(bnd)
    bnd.add_argument("--new-key-slot", type=int, metavar="N",
                     help="the slot for the binding's key (default: the first free)")
    pbkdf_args(bnd)
    _log_args(bnd)
    unb = sub.add_parser("unbind", help="remove a clevis binding and its key slot "
                         "(clevis luks unbind)")
    unbind_args(unb)
    volume_args(unb)
    _log_args(unb)
    ren = sub.add_parser("reencrypt", help="rotate the volume key: every sector rewritten "
                         "under a new one, resumable after a crash (cryptsetup reencrypt)")
    volume_args(ren)
    _key_args(ren)
    reencrypt_args(ren)
    pbkdf_args(ren)
    _log_args(ren)
    for name, what in (("header-backup", "save the header and key slots (luksHeaderBackup)"),
                       ("header-restore", "put a header backup back (luksHeaderRestore)")):
        p = sub.add_parser(name, help=what)
        p.add_argument("file", metavar="FILE", help="the backup file")
        volume_args(p)
        if name == "header-restore":
            p.add_argument("--force", action="store_true",
                           help="restore a backup of another volume, or over no header")
        _log_args(p)


def serve_parser() -> argparse.ArgumentParser:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            serve: argparse.ArgumentParser = action.choices["serve"]
            return serve
    raise AssertionError("no serve command")


def explicit_options(argv: Sequence[str]) -> argparse.Namespace:
    """Only the options of `serve` that `argv` names (argparse's defaults
    cannot tell a value given from a default): they override [server]."""
    parser = serve_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    args = list(argv)
    given = parser.parse_args(args[1:] if args[:1] == ["serve"] else args)
    given.__dict__.pop("config", None)
    return given
