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


def test_size_classes_keep_the_pool_reusable_under_random_sizes() -> None:
    from nbdluks.nbd.buffers import size_class

    assert size_class(1000) == 1000  # small: not pooled anyway
    assert size_class(MIN_POOLED) == MIN_POOLED
    assert size_class(MIN_POOLED + 1) == 2 * MIN_POOLED
    assert size_class(3 << 20) == 4 << 20
    pool = BufferPool(64 << 20)
    odd = pool.get(300_000)
    pool.put(odd)
    assert pool.free_bytes == 0  # one exact odd size would never be asked for again
    buf = pool.get_at_least(300_000)
    assert len(buf) == 512 * 1024
    pool.put(buf)
    assert pool.get_at_least(400_000) is buf


def test_memory_budget_waits_and_wakes() -> None:
    from nbdluks.nbd.buffers import MemoryBudget

    budget = MemoryBudget(100)
    assert budget.allows(500)  # alone, anything runs
    budget.charge(80)
    assert budget.allows(20) and not budget.allows(21) and not budget.full
    woken: list[int] = []
    budget.wait(lambda: woken.append(1))
    budget.charge(30)
    assert budget.full
    budget.release(5)
    assert budget.full and not woken  # still past the limit
    budget.release(60)
    assert woken == [1] and budget.used == 45
    budget.release(45)
    assert woken == [1]  # woken once per wait
