"""RangeLock: exclusive per byte range across threads and processes, and
released by the kernel when its holder is killed."""

from __future__ import annotations

import os
import signal
import threading
import time

from nbdluks.block.locks import RangeLock

_takers: list[threading.Thread] = []


def acquired_within(lock: RangeLock, start: int, length: int, seconds: float) -> bool:
    """Whether another thread gets [start, start+length) within `seconds`
    (a thread that did not keeps waiting: see `join_takers`)."""
    got = threading.Event()

    def take() -> None:
        with lock.hold(start, length):
            got.set()

    t = threading.Thread(target=take, daemon=True)
    t.start()
    _takers.append(t)
    return got.wait(seconds)


def join_takers() -> None:
    """Before closing the lock: every waiting thread got its range by now."""
    while _takers:
        t = _takers.pop()
        t.join(10)
        assert not t.is_alive()


def test_threads_exclude_each_other_only_on_overlapping_ranges() -> None:
    lock = RangeLock()
    try:
        with lock.hold(4096, 4096):
            assert acquired_within(lock, 0, 4096, 2)  # disjoint
            assert acquired_within(lock, 8192, 4096, 2)
            assert not acquired_within(lock, 8191, 2, 0.3)  # overlaps the last byte
        assert acquired_within(lock, 4096, 4096, 2)  # released
        join_takers()
    finally:
        lock.close()


def _child_holding(lock: RangeLock, start: int, length: int) -> tuple[int, int]:
    """Fork a child that takes the range and then sleeps; wait until it holds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(r)
            with lock.hold(start, length):
                os.write(w, b"x")
                time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid, 0


def test_another_process_is_excluded_until_its_holder_is_killed() -> None:
    lock = RangeLock()
    try:
        with lock.hold(0, 512):  # the parent's own descriptor is not the child's
            pass
        pid, _ = _child_holding(lock, 0, 4096)
        try:
            assert not acquired_within(lock, 512, 512, 0.3)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            # a multiprocessing lock would stay held forever here
            assert acquired_within(lock, 512, 512, 5)
            join_takers()
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
    finally:
        lock.close()
