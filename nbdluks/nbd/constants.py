"""NBD wire values, in one place (doc/proto.md of NetworkBlockDevice/nbd)."""

from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

DEFAULT_PORT = 10809
# The largest READ or WRITE we take (nbdkit's), advertised in block-size
# info; memory stays bounded by the in-flight caps, not by this.
MAX_PAYLOAD = 64 * 1024 * 1024
# Strings (export names, descriptions, errors) must not exceed this.
MAX_STRING = 4096
# Option payloads larger than this are refused without buffering them.
MAX_OPTION_LENGTH = 64 * 1024

GREETING_SIZE = 18
OPTION_HEADER_SIZE = 16
OPTION_REPLY_HEADER_SIZE = 20
REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
CHUNK_HEADER_SIZE = 20

BASE_ALLOCATION = "base:allocation"


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


class Opt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 0x80000001
    ERR_POLICY = 0x80000002
    ERR_INVALID = 0x80000003
    ERR_PLATFORM = 0x80000004
    ERR_TLS_REQD = 0x80000005
    ERR_UNKNOWN = 0x80000006
    ERR_SHUTDOWN = 0x80000007
    ERR_BLOCK_SIZE_REQD = 0x80000008
    ERR_TOO_BIG = 0x80000009


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TxFlag(IntFlag):
    HAS_FLAGS = 0x1
    READ_ONLY = 0x2
    SEND_FLUSH = 0x4
    SEND_FUA = 0x8
    ROTATIONAL = 0x10
    SEND_TRIM = 0x20
    SEND_WRITE_ZEROES = 0x40
    SEND_DF = 0x80
    CAN_MULTI_CONN = 0x100
    SEND_RESIZE = 0x200
    SEND_CACHE = 0x400
    SEND_FAST_ZERO = 0x800


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(IntFlag):
    FUA = 0x1
    NO_HOLE = 0x2
    DF = 0x4
    REQ_ONE = 0x8
    FAST_ZERO = 0x10


# Plain-int copies of the flags tested on every request: an operator on an
# IntFlag member runs Python-level enum code, one on an int does not.
FLAG_FUA = int(CmdFlag.FUA)
FLAG_NO_HOLE = int(CmdFlag.NO_HOLE)
FLAG_DF = int(CmdFlag.DF)
FLAG_REQ_ONE = int(CmdFlag.REQ_ONE)
FLAG_FAST_ZERO = int(CmdFlag.FAST_ZERO)


class Chunk(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


CHUNK_FLAG_DONE = 0x1

# base:allocation extent flags
STATE_HOLE = 0x1
STATE_ZERO = 0x2


class Errno(IntEnum):
    """Error values on the wire; they match Linux errno numbers."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


def cmd_name(cmd: int) -> str:
    """For logs: a command's name, or its number when unknown."""
    return Cmd(cmd).name if cmd in Cmd._value2member_map_ else str(cmd)


def flag_names(flags: TxFlag) -> str:
    """For logs: transmission flags as NAME|NAME."""
    return "|".join(f.name or "" for f in TxFlag if f in flags)
