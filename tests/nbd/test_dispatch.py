"""Small requests run on the event loop while the storage answers fast;
slow storage moves them to worker threads, and one slow request does not."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nbdluks.block.file import FileDevice
from nbdluks.nbd.constants import Cmd, TxFlag
from nbdluks.nbd.dispatch import INLINE_BACKOFF, INLINE_SLOW_RUN, Dispatcher
from nbdluks.nbd.handshake import ExportInfo, Negotiated
from nbdluks.nbd.wire import Request


class SlowFile(FileDevice):
    """A file whose reads take `delay` seconds, as a cold disk's would."""

    delay = 0.0

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        time.sleep(self.delay)
        super()._pread_into(buf, offset)


def test_inlining_backs_off_only_when_the_storage_stays_slow(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))

    async def main() -> None:
        dev = SlowFile(str(img))
        dispatch = Dispatcher(asyncio.get_running_loop(), threads=1)
        neg = Negotiated(ExportInfo("", dev.size, TxFlag.HAS_FLAGS), TxFlag.HAS_FLAGS,
                         structured=False, no_zeroes=True)
        req = Request(0, Cmd.READ, 1, 0, 4096)

        def read() -> None:
            assert dispatch.may_inline(dev, req)
            result = dispatch.run_inline(dev, req, neg)
            assert not isinstance(result, BaseException)

        for _ in range(20):
            read()
        for delay in (0.002, 0.05):  # one request preempted, even long: still inline
            dev.delay = delay
            read()
            dev.delay = 0.0
            read()
        dev.delay = 0.006  # the disk is slow now: a few of those, then threads
        slow = 0
        while dispatch.may_inline(dev, req):
            read()
            slow += 1
            assert slow <= INLINE_SLOW_RUN, f"still inline after {slow} slow reads"
        dev.delay = 0.0
        await asyncio.sleep(INLINE_BACKOFF + 0.05)  # and after a while, inline again
        read()
        dev.close()
        dispatch.shutdown()

    asyncio.run(main())
