"""The volume's life on the command line: `format`, `add-key`,
`change-key`, `remove-key`, `kill-slot`, `header-backup`, `header-restore`,
`bind`, `unbind`: cryptsetup's (and clevis') option names, our sources."""

from __future__ import annotations

import argparse

from ..luks import RESILIENCES, FormatSpec, LuksError
from ..manage import (
    KDF_TYPES,
    PINS,
    KdfOptions,
    ManageError,
    NewKey,
    ReencryptOptions,
    Target,
    add_key,
    bind,
    change_key,
    format_volume,
    header_backup,
    header_restore,
    kill_slot,
    reencrypt,
    remove_key,
    unbind,
)
from ..nbd import UpstreamOptions
from .options import UsageError, check_args, unlock_options

COMMANDS = ("format", "add-key", "change-key", "remove-key", "kill-slot", "header-backup",
            "header-restore", "bind", "unbind", "reencrypt")
_REENCRYPT = ReencryptOptions()
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_KDF = KdfOptions()


def volume_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the volume (a path to a file or block device, or an NBD URI)")
    g.add_argument("--header", metavar="SRC", action="append",
                   help="the detached LUKS header (default: at the start of the payload)")
    g.add_argument("--payload", metavar="SRC", help="the encrypted payload")
    g.add_argument("--upstream-timeout", type=float, default=UpstreamOptions().timeout,
                   metavar="S", help="seconds an NBD source may take to answer")


def pbkdf_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the new key slot's KDF (cryptsetup's defaults: argon2id for "
                             "LUKS2, pbkdf2 for LUKS1, benchmarked to --iter-time)")
    g.add_argument("--pbkdf", choices=KDF_TYPES, help="the KDF")
    g.add_argument("--hash", default=_KDF.hash, help=f"PBKDF2 and AF hash (default {_KDF.hash})")
    g.add_argument("-i", "--iter-time", type=int, default=_KDF.iter_time, metavar="MS",
                   help=f"milliseconds the KDF takes here (default {_KDF.iter_time})")
    g.add_argument("--pbkdf-force-iterations", type=int, metavar="N",
                   help="iterations (PBKDF2) or time cost (Argon2), no benchmark")
    g.add_argument("--pbkdf-memory", type=int, metavar="KiB",
                   help="Argon2 memory (default 1048576, at most half the RAM)")
    g.add_argument("--pbkdf-parallel", type=int, metavar="N",
                   help="Argon2 threads (default: up to 4, one per CPU)")


def key_file_args(p: argparse.ArgumentParser, which: str, prefix: str = ""
                  ) -> argparse._ArgumentGroup:
    """Where a key that is being set comes from: a passphrase file, a key
    file (part of one), or the terminal, asked twice."""
    g = p.add_argument_group(f"the {which} key (a file, /dev/fd/N or -; default: typed "
                             "twice on the terminal)")
    x = g.add_mutually_exclusive_group()
    x.add_argument(f"--{prefix}passphrase-file", metavar="F", help="its first line")
    x.add_argument(f"--{prefix}key-file", metavar="F", help="its bytes, exactly")
    g.add_argument(f"--{prefix}keyfile-offset", type=int, default=0, metavar="N",
                   help="skip N bytes of the key file")
    g.add_argument(f"--{prefix}keyfile-size", type=int, metavar="N",
                   help="read N bytes of the key file")
    return g


def new_key_args(p: argparse.ArgumentParser, *, slot: bool = True) -> None:
    g = key_file_args(p, "new", "new-")
    if slot:
        g.add_argument("--new-key-slot", type=int, metavar="N",
                       help="the slot for the new key (default: the first free)")


def format_args(p: argparse.ArgumentParser) -> None:
    spec = FormatSpec()
    g = p.add_argument_group("the new volume (cryptsetup luksFormat's options)")
    g.add_argument("--type", choices=("luks1", "luks2"), default="luks2",
                   help="the LUKS version (default luks2)")
    g.add_argument("-c", "--cipher", default=spec.cipher, help=f"default {spec.cipher}")
    g.add_argument("-s", "--key-size", type=int, default=spec.key_size * 8, metavar="BITS",
                   help=f"volume key size in bits (default {spec.key_size * 8})")
    g.add_argument("--sector-size", type=int,
                   help="encryption sector size, 512..4096 (LUKS2; default: what suits the "
                   "payload, as cryptsetup picks it: a file's file system block, a device's "
                   "block size; LUKS1: 512)")
    g.add_argument("--label", default="", help="LUKS2 label")
    g.add_argument("--subsystem", default="", help="LUKS2 subsystem")
    g.add_argument("--uuid", default="", help="the volume's UUID (default: random)")
    g.add_argument("--luks2-metadata-size", type=int, default=spec.metadata_size,
                   metavar="BYTES", help="one LUKS2 metadata copy, 16 KiB..4 MiB, a power of 2")
    g.add_argument("--luks2-keyslots-size", type=int, metavar="BYTES",
                   help="the LUKS2 key slots area (default: up to the data, 16 MiB in all)")
    g.add_argument("--offset", type=int, metavar="SECTORS",
                   help="where the data starts in the payload, in 512-byte sectors")
    g.add_argument("--key-slot", type=int, metavar="N", help="the first key's slot (default 0)")
    g.add_argument("--force", action="store_true",
                   help="write over an existing LUKS header (that volume is lost)")
    g.add_argument("--volume-key-file", metavar="F",
                   help="use this volume key instead of a random one")


def bind_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pin", choices=PINS, help="the clevis pin")
    p.add_argument("pin_config", metavar="CONFIG",
                   help='the pin\'s JSON configuration, as clevis takes it, e.g. '
                   '\'{"url": "http://tang.example", "thp": "..."}\'')
    p.add_argument("-y", "--trust", action="store_true",
                   help="trust a fetched Tang advertisement without a thp (clevis -y)")


def unbind_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-id", type=int, required=True, metavar="N",
                   help="the clevis token to remove, with its key slot")
    p.add_argument("--force", action="store_true",
                   help="even when its key slots are the last ones (the data is then lost)")


def reencrypt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the reencryption (cryptsetup reencrypt's options)")
    g.add_argument("--resilience", choices=RESILIENCES, default=_REENCRYPT.resilience,
                   help="how a step survives a crash: checksums of the zone (default), a "
                   "copy of it (journal), or nothing")
    g.add_argument("--resilience-hash", default=_REENCRYPT.hash, metavar="HASH",
                   help=f"the checksums' hash (default {_REENCRYPT.hash})")
    g.add_argument("--hotzone-size", type=size_arg, default=_REENCRYPT.hotzone_size,
                   metavar="SIZE", help="bytes rewritten per step, at most (K, M, G "
                   f"suffixes; default {_REENCRYPT.hotzone_size >> 20}M)")
    g.add_argument("-c", "--cipher", help="the new cipher (default: the current one)")
    g.add_argument("-s", "--key-size", type=int, metavar="BITS",
                   help="the new volume key's size (default: the current one's)")
    g.add_argument("--sector-size", type=int, help="the new encryption sector size")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--init-only", action="store_true",
                   help="only start it: the header says so, no data is rewritten")
    x.add_argument("--resume-only", action="store_true",
                   help="only go on with one already started (by nbdluks or cryptsetup)")


def _new_slots_kdf(args: argparse.Namespace) -> KdfOptions | None:
    """The new key slots' KDF when one is asked for (default: the old slots' costs)."""
    asked = (args.pbkdf, args.pbkdf_force_iterations, args.pbkdf_memory, args.pbkdf_parallel)
    if all(v is None for v in asked) and (args.iter_time, args.hash) == (_KDF.iter_time,
                                                                          _KDF.hash):
        return None
    return kdf_options(args, 2)


def size_arg(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = int(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be above 0")
    return value


def reencrypt_command(args: argparse.Namespace) -> int:
    if args.payload is None:
        raise UsageError("reencrypt needs --payload (and --header for a detached header)")
    opts = ReencryptOptions(
        resilience=args.resilience, hash=args.resilience_hash, hotzone_size=args.hotzone_size,
        cipher=args.cipher, key_size=None if args.key_size is None else _key_bytes(
            args.key_size), sector_size=args.sector_size, init_only=args.init_only,
        resume_only=args.resume_only, kdf=_new_slots_kdf(args))
    try:
        opts.check()
    except ManageError as e:
        raise UsageError(str(e)) from None
    done = reencrypt(target(args), args.payload, unlock_options(args), opts)
    if args.init_only:
        print("reencryption started: nothing rewritten yet (go on with --resume-only)")
    elif done.finished:
        print(f"reencryption finished: {done.size} bytes under the new volume key")
    else:
        print(f"reencryption stopped at {done.done} of {done.size} bytes: go on with "
              "--resume-only")
    return 0


def target(args: argparse.Namespace) -> Target:
    headers = args.header or []
    if len(headers) > 1:
        raise UsageError("--header: give one header to change (copies are for serve)")
    source = headers[0] if headers else args.payload
    if not source:
        raise UsageError("give --payload (the header at its start) or --header")
    return Target(source, UpstreamOptions(timeout=args.upstream_timeout),
                  getattr(args, "argon2_max_memory", Target("").argon2_max_kib))


def kdf_options(args: argparse.Namespace, version: int | None) -> KdfOptions:
    kdf = KdfOptions(pbkdf=args.pbkdf, hash=args.hash, iter_time=args.iter_time,
                     force_iterations=args.pbkdf_force_iterations, memory=args.pbkdf_memory,
                     parallel=args.pbkdf_parallel)
    try:
        kdf.check(version or 2)
    except ManageError as e:
        raise UsageError(str(e)) from None
    return kdf


def new_key(args: argparse.Namespace) -> NewKey:
    if args.new_keyfile_offset < 0 or (args.new_keyfile_size is not None
                                       and args.new_keyfile_size < 1):
        raise UsageError("--new-keyfile-offset/--new-keyfile-size: must be 0+ / 1+ bytes")
    if args.new_key_file is None and (args.new_keyfile_offset or args.new_keyfile_size):
        raise UsageError("--new-keyfile-offset/--new-keyfile-size need --new-key-file")
    new = NewKey(args.new_passphrase_file, args.new_key_file, args.new_keyfile_offset,
                 args.new_keyfile_size)
    old = [args.passphrase_file, args.key_file, args.volume_key_file]
    if "-" in old and (new.passphrase_file in (None, "-") and new.key_file in (None, "-")):
        raise UsageError("standard input cannot give both the existing key and the new one: "
                         "give one of them as a file")
    return new


def format_command(args: argparse.Namespace) -> int:
    check_args(args)
    spec = FormatSpec(
        version=1 if args.type == "luks1" else 2, cipher=args.cipher,
        key_size=_key_bytes(args.key_size), sector_size=args.sector_size, uuid=args.uuid,
        label=args.label, subsystem=args.subsystem, metadata_size=args.luks2_metadata_size,
        hash=args.hash,
        keyslots_size=args.luks2_keyslots_size,
        offset=None if args.offset is None else args.offset * 512)
    try:
        spec.check()
    except LuksError as e:
        raise UsageError(str(e)) from None
    kdf = kdf_options(args, spec.version)
    headers = args.header or []
    if len(headers) > 1 or not (headers or args.payload):
        raise UsageError("give --payload, and --header for a detached header")
    new = NewKey(args.passphrase_file, args.key_file, args.keyfile_offset, args.keyfile_size)
    done = format_volume(headers[0] if headers else args.payload, args.payload, spec, kdf,
                         new, upstream=UpstreamOptions(timeout=args.upstream_timeout),
                         volume_key_file=args.volume_key_file, slot=args.key_slot,
                         force=args.force)
    print(f"LUKS{done.version} volume {done.uuid} formatted: key slot {done.slot}, data "
          f"at {done.data_offset} bytes")
    return 0


def _key_bytes(bits: int) -> int:
    if bits <= 0 or bits % 8:
        raise UsageError(f"--key-size {bits}: a positive number of bits, a multiple of 8")
    return bits // 8


def run(args: argparse.Namespace) -> int:
    """One lifecycle command; its exit status."""
    if args.command == "format":
        return format_command(args)
    check_args(args)
    where = target(args)
    if args.command == "header-backup":
        size = header_backup(where, args.file)
        print(f"header backup written to {args.file} ({size} bytes)")
        return 0
    if args.command == "unbind":
        slots = unbind(where, args.token_id, force=args.force)
        print(f"token {args.token_id} and key slot {', '.join(map(str, slots))} removed")
        return 0
    if args.command == "header-restore":
        vol = header_restore(where, args.file, force=args.force)
        print(f"header of volume {vol.uuid} restored from {args.file}")
        return 0
    if args.command == "reencrypt":
        return reencrypt_command(args)
    keys = unlock_options(args)
    if args.command == "add-key":
        slot = add_key(where, keys, new_key(args), kdf_options(args, None), args.new_key_slot)
        print(f"key slot {slot} added")
    elif args.command == "change-key":
        slot = change_key(where, keys, new_key(args), kdf_options(args, None))
        print(f"key slot {slot} changed")
    elif args.command == "bind":
        bound = bind(where, keys, args.pin, args.pin_config, kdf_options(args, 2),
                     trust=args.trust, timeout=args.tang_timeout, slot=args.new_key_slot)
        print(f"bound to {args.pin}: token {bound.token}, key slot {bound.slot}")
    elif args.command == "remove-key":
        print(f"key slot {remove_key(where, keys, force=args.force)} removed")
    else:
        kill_slot(where, keys, args.slot, force=args.force)
        print(f"key slot {args.slot} killed")
    return 0
