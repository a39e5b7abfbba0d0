"""NBD: the protocol as sans-IO codec and rules (constants, wire, handshake,
commands), the server's runtime (listen, server, connection with its
negotiation and flow control, dispatch, buffers, registry, stats, tls), and
the client side (client, upstream: another server's export as a device)."""

from . import stats
from .client import NbdClient, NbdClientError
from .commands import Export
from .constants import DEFAULT_PORT, Cmd
from .handshake import TlsMode
from .listen import Listen, activated, address, bind, cleanup, give
from .options import MiB, ServerOptions
from .server import NbdServer
from .stats import COMMANDS, StatsTable, Totals
from .tls import ServerCredentials, TlsConfigError, TlsFileMissingError
from .upstream import NbdDevice, UpstreamOptions
from .uri import NbdUri, UriError, is_nbd_uri, parse_uri

__all__ = ["COMMANDS", "DEFAULT_PORT", "Cmd", "Export", "Listen", "MiB", "NbdClient",
           "NbdClientError", "NbdDevice", "NbdServer", "NbdUri", "ServerCredentials",
           "ServerOptions", "StatsTable", "TlsConfigError", "TlsFileMissingError", "TlsMode",
           "Totals", "UpstreamOptions", "UriError", "activated", "address", "bind", "cleanup",
           "give",
           "is_nbd_uri", "parse_uri", "stats"]
