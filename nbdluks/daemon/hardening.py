"""Keep key material out of core dumps, debuggers and swap.

A core of a crashed worker holds the raw volume key: the process is made
non-dumpable (which also keeps other users' debuggers out) and its core
size limit 0. (The key's pages are locked in memory by the device that
holds it, in each process: luks.unlock.lock_in_memory; locked_kib says
what took effect.) Also here: a worker's tie to its
supervisor, and dropping root once the sources are open.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import signal
from typing import Any

from ..errors import NbdluksError

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


def harden_process() -> dict[str, Any]:
    """No core dumps, not dumpable; what took effect, for the log."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    return {"dumpable": _libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0),
            "core_limit": resource.getrlimit(resource.RLIMIT_CORE)[0]}


def locked_kib() -> int:
    """KiB of this process's memory locked (VmLck): what mlock really did
    here, since locks are not inherited over fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def stop_with_parent(parent: int) -> None:
    """A worker gets SIGTERM (and drains) when its supervisor dies, even
    by SIGKILL: no orphan keeps the key or the payload open."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


class PrivilegeError(NbdluksError):
    """The user to run as cannot be switched to."""


def resolve_user(spec: str) -> tuple[int, int]:
    """USER[:GROUP], names or numbers, to uid and gid (the user's group by default)."""
    import grp
    import pwd

    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = pw.pw_uid, pw.pw_gid
    except KeyError:
        if not user.isdigit():
            raise PrivilegeError(f"no user {user!r}") from None
        uid = gid = int(user)  # a numeric user without a passwd entry (containers)
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"no group {group!r}") from None
    return uid, gid


def drop_privileges(uid: int, gid: int) -> bool:
    """Become uid:gid for good (root only; nothing to do when already them).
    Whatever was opened before stays usable; capabilities are gone after."""
    if os.getuid() == uid and os.geteuid() == uid and os.getgid() == gid:
        return False
    if os.geteuid() != 0:
        raise PrivilegeError(f"cannot switch to uid {uid}: not running as root")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.geteuid() != uid or os.getegid() != gid:  # never serve as root by mistake
        raise PrivilegeError(f"switching to {uid}:{gid} did not take effect")
    # A change of uid resets the dumpable flag: set it again.
    harden_process()
    return True


def raise_open_files_limit() -> int:
    """Many volumes hold many descriptors (payloads, range locks, upstream
    connections): the soft limit goes up to the hard one. The new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
