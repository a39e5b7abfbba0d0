"""`nbdluks probe URI`: is an NBD export being served? A real client check
(connect, negotiate, optionally read the first block) for health checks and
Kubernetes exec probes: one line out, exit 0 when it serves."""

from __future__ import annotations

from ..nbd import Cmd, NbdClient, NbdClientError, NbdUri

# Bytes read by --read (less for a smaller export, more for a larger block).
PROBE_READ = 4096


def probe(uri: NbdUri, *, read: bool, timeout: float) -> tuple[bool, str]:
    """(serving?, the line to print)."""
    try:
        client = NbdClient(uri, connect_timeout=timeout, request_timeout=timeout)
    except NbdClientError as e:
        return False, f"down: {e}"
    try:
        detail = f"size={client.size}"
        if read and client.size:
            n = min(client.size, max(PROBE_READ, client.min_block))
            client.request(Cmd.READ, 0, n, buf=memoryview(bytearray(n)))
            detail += f" read={n}"
    except OSError as e:
        return False, f"down: {uri}: reading failed: {e.strerror}"
    finally:
        client.close()
    return True, f"up: {uri} {detail}"
