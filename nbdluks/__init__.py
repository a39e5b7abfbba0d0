"""nbdluks: serve the decrypted contents of a LUKS volume over NBD."""

__version__ = "0.1.0"
