"""The root of every error nbdluks raises on purpose.

Each family lives with the code that raises it, and all derive from
NbdluksError: luks.errors (headers, keys, what is not supported) and
luks.unlock (slots skipped); nbd.wire (protocol), nbd.client, nbd.tls,
nbd.uri; unlock.sources, unlock.secrets, unlock.keys, unlock.tokens and
unlock.clevis (jose, pins); daemon.lifecycle (listening), daemon.hardening
(users), daemon.readiness (pid files); cli.options (usage, exit status 2).
Messages are one line, name the reason and never carry a secret. Lower
layers describe what went wrong with fields; only the command line names
its flags, in a hint (cli.options.hint).
"""


class NbdluksError(Exception):
    """An expected failure with a one-line, secret-free message."""
