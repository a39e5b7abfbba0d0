"""Block devices: the contract every source and filter offers the server
(base), local files and block devices (file), and a lock over byte ranges
that processes share (locks)."""

from .base import (
    BlockDevice,
    Buffer,
    Capabilities,
    Decrypt,
    DirectRead,
    Extent,
    Passed,
    unsupported,
    zero_fill,
)
from .file import FileDevice
from .locks import RangeLock, SharedCells

__all__ = ["BlockDevice", "Buffer", "Capabilities", "Decrypt", "DirectRead", "Extent",
           "FileDevice", "Passed", "RangeLock", "SharedCells", "unsupported", "zero_fill"]
