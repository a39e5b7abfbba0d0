"""The root of every error nbdluks raises on purpose.

Each family lives with the code that raises it (luks.errors, secrets,
source, nbd.wire, nbd.client, nbd.tls, nbd.uri, cli); all derive from
NbdluksError. Messages are one line, name the reason and never carry a
secret. Lower layers describe what went wrong with fields; only the CLI
names its flags in a hint (see cli.hint).
"""


class NbdluksError(Exception):
    """An expected failure with a one-line, secret-free message."""
