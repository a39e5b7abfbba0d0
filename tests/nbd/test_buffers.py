"""The request buffer pool: reuse, and never while something still views a buffer."""

from __future__ import annotations

from nbdluks.nbd.buffers import MIN_POOLED, BufferPool, viewed

N = 256 * 1024


def test_a_returned_buffer_is_handed_out_again() -> None:
    pool = BufferPool(8 * N)
    a = pool.get(N)
    assert len(a) == N
    pool.put(a)
    assert pool.free_bytes == N
    assert pool.get(N) is a
    assert pool.free_bytes == 0
    assert len(pool.get(N)) == N  # empty again: a fresh one


def test_sizes_are_exact() -> None:
    pool = BufferPool(8 * N)
    pool.put(pool.get(N))
    b = pool.get(N + 4096)
    assert len(b) == N + 4096
    assert pool.free_bytes == N


def test_a_viewed_buffer_waits_until_the_view_is_gone() -> None:
    pool = BufferPool(8 * N)
    a = pool.get(N)
    view = memoryview(a)[100:200]  # as uvloop holds a reply that is not sent yet
    assert viewed(a)
    pool.put(a)
    assert pool.free_bytes == 0
    assert pool.get(N) is not a
    view.release()
    assert not viewed(a)
    pool.put(pool.get(N))  # any later put retries the waiting ones
    assert pool.free_bytes == 2 * N
    assert len(a) == N  # the probe left it as it was


def test_small_buffers_are_not_pooled_and_the_pool_is_bounded() -> None:
    pool = BufferPool(2 * N)
    pool.put(bytearray(MIN_POOLED - 1))
    assert pool.free_bytes == 0
    bufs = [pool.get(N) for _ in range(3)]
    for b in bufs:
        pool.put(b)
    assert pool.free_bytes == 2 * N
