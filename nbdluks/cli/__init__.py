"""The command line: `nbdluks serve`, `inspect` and `probe`. The only
package that names a flag."""

from .arguments import build_parser
from .main import main

__all__ = ["build_parser", "main"]
