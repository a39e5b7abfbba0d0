"""Running the server as a daemon: its lifecycle (listen, drop root,
announce, serve, clean up), worker processes and their supervisor,
hardening, readiness for supervisors (systemd, pid files), the CPUs it may
use, logging, and metrics with health over HTTP."""

from .cpus import usable_cpus
from .hardening import PrivilegeError, harden_process, raise_open_files_limit, resolve_user
from .lifecycle import DaemonOptions, Opening, SetupError, run
from .log import fatal
from .log import setup as setup_logging
from .reload import Reread
from .rotator import Rotator
from .serving import ServeOptions

__all__ = [
    "DaemonOptions", "Opening", "PrivilegeError", "Reread", "Rotator", "ServeOptions",
    "SetupError", "fatal",
    "harden_process", "raise_open_files_limit", "resolve_user", "run", "setup_logging",
    "usable_cpus",
]
