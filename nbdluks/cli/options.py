"""From parsed arguments to the options objects, built once; flag values
that cannot work refused before anything is unlocked (exit 2); and the
flag that would help, added to a lower layer's error."""

from __future__ import annotations

import argparse
import os

from ..daemon import PrivilegeError, SetupError, resolve_user
from ..errors import NbdluksError
from ..luks import Argon2MemoryError, SlotsSkippedError
from ..nbd import (
    DEFAULT_PORT,
    Listen,
    MiB,
    ServerCredentials,
    ServerOptions,
    TlsConfigError,
    TlsFileMissingError,
    TlsMode,
    UpstreamOptions,
    UriError,
    is_nbd_uri,
    parse_uri,
)
from ..unlock import (
    MAX_KEYFILE,
    UNLOCKING_TYPES,
    KeyFileShortError,
    NewlineKeyError,
    NoTokenError,
    RotateSettings,
    TokenOptions,
    UnlockOptions,
    VolumeConfig,
    VolumeOptions,
)


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
        argon2_max_kib=args.argon2_max_memory, kdf_limit=args.kdf_limit,
        tokens=TokenOptions(token_id=args.token_id, token_type=args.token_type,
                            timeout=args.tang_timeout),
    )
    if keys.given() and (args.token_only or args.token_id is not None or args.token_type):
        raise UsageError("--token-only/--token-id/--token-type unlock through tokens: "
                         "they exclude --passphrase-file, --key-file and --volume-key-file")
    if args.token_type and args.token_type not in UNLOCKING_TYPES:
        raise UsageError(f"--token-type {args.token_type}: only "
                         f"{', '.join(UNLOCKING_TYPES)} tokens can unlock here")
    if args.kdf_limit <= 0:
        raise UsageError("--kdf-limit must be more than 0 seconds")
    if args.tang_timeout <= 0:
        raise UsageError("--tang-timeout must be more than 0 seconds")
    return keys


def server_options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        max_connections=args.max_connections, max_inflight=args.max_inflight * MiB,
        max_memory=args.max_memory * MiB,
        threads=args.threads, tls=TlsMode(args.tls), credentials=tls_credentials(args),
        handshake_timeout=args.handshake_limit, stall_timeout=args.stall_limit,
        busy_poll_us=args.busy_poll,
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
    "busy_poll": (0, 1000, "--busy-poll"),
    "keyfile_offset": (0, None, "--keyfile-offset"),
    "keyfile_size": (1, MAX_KEYFILE, "--keyfile-size"),
    "key_slot": (0, 31, "--key-slot"),
    "argon2_max_memory": (8, None, "--argon2-max-memory"),
    "new_key_slot": (0, 31, "--new-key-slot"),
    "slot": (0, 31, "the key slot"),
    "offset": (0, None, "--offset"),
    "iter_time": (1, 3_600_000, "-i/--iter-time"),
    "token_id": (0, 31, "--token-id"),
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
    if getattr(args, "stall_limit", 1) <= 0:
        raise UsageError("--stall-limit must be more than 0 seconds")
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


def metrics_address(value: str) -> Listen:
    """--metrics [ADDR:]PORT, ADDR possibly an [IPv6] literal."""
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--metrics {value}: give [ADDR:]PORT with a port of 1..65535")
    return Listen(host=host, port=int(port))


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


def volume_config(args: argparse.Namespace) -> VolumeConfig:
    """The volume `serve` is asked for: a raw source, or a payload and its
    header copies with the key options."""
    options = VolumeOptions(
        read_only=args.read_only, allow_discards=args.allow_discards,
        upstream=UpstreamOptions(timeout=args.upstream_timeout,
                                 reconnect=args.upstream_reconnect),
    )
    common = {"name": args.export_name, "description": args.description, "options": options}
    if args.raw:
        if args.payload or args.header or getattr(args, "reencrypt", False):
            raise UsageError("--raw cannot be combined with --payload/--header/--reencrypt")
        return VolumeConfig(raw=args.raw, **common)
    if not args.payload:
        raise UsageError("nothing to serve: give --payload SRC (LUKS) or --raw SRC")
    return VolumeConfig(payload=args.payload, headers=tuple(args.header or ()),
                        keys=unlock_options(args), rotate=rotate_settings(args), **common)


def rotate_settings(args: argparse.Namespace) -> RotateSettings | None:
    """--reencrypt and its settings (an export's `reencrypt = true`)."""
    if not getattr(args, "reencrypt", False):
        return None
    if args.read_only:
        raise UsageError("--reencrypt needs a --payload served read-write")
    if args.reencrypt_rate < 0:
        raise UsageError("--reencrypt-rate cannot be negative")
    return RotateSettings(args.reencrypt_rate * 2**20 if args.reencrypt_rate else None,
                          args.resilience, args.hotzone_size)


def listen_options(args: argparse.Namespace) -> list[Listen]:
    """Where to listen; none given: the default (or systemd's sockets)."""
    listens = []
    if args.socket_mode is not None and not args.socket:
        raise UsageError("--socket-mode needs -k/--socket")
    if args.socket:
        listens.append(Listen(socket_path=args.socket, mode=socket_mode(args.socket_mode)))
    if args.bind or args.port is not None:
        listens.append(Listen(host=args.bind or "127.0.0.1", port=args.port or DEFAULT_PORT))
    return listens


def socket_mode(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise UsageError(f"--socket-mode {text}: give permissions in octal, 000..777")
    return mode


def setup_error(e: SetupError) -> UsageError:
    """The daemon could not listen: the message with the flag to blame."""
    if e.what == "metrics":
        return UsageError(f"--metrics: {e}")
    if e.what == "activation-conflict":
        return UsageError("socket activation (LISTEN_FDS) excludes -k, -b and -p")
    return UsageError(str(e))
