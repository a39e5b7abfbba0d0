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


class Acct:
    held = 0


def test_memory_budget_waits_and_wakes() -> None:
    from nbdluks.nbd.buffers import MemoryBudget

    budget = MemoryBudget(100)  # one connection: a reserve of 50, 50 shared
    a = Acct()
    assert budget.allows(a, 500)  # alone, anything runs
    budget.charge(a, 80)
    assert budget.allows(a, 20) and not budget.allows(a, 21) and budget.room(a)
    woken: list[int] = []
    budget.wait(lambda: woken.append(1))
    budget.charge(a, 30)
    assert not budget.room(a) and budget.used == 110
    budget.release(a, 5)
    assert not budget.room(a) and not woken  # still past the limit
    budget.release(a, 60)
    assert woken == [1] and budget.used == 45 and a.held == 45
    budget.release(a, 45)
    assert woken == [1]  # woken once per wait


def test_each_connection_keeps_its_reserve_whatever_the_others_hold() -> None:
    from nbdluks.nbd.buffers import MemoryBudget

    budget = MemoryBudget(1000, connections=5)  # reserves of 100, 500 shared
    assert (budget.reserve, budget.shared_limit) == (100, 500)
    hogs = [Acct(), Acct()]
    budget.charge(hogs[0], 400)  # 300 of it shared
    assert budget.allows(hogs[1], 300) and not budget.allows(hogs[1], 301)
    budget.charge(hogs[1], 300)  # 200 shared: the shared part is spent
    assert budget.shared_used == 500 and not budget.room(hogs[0])
    assert not budget.allows(hogs[1], 1)
    fresh = Acct()
    assert budget.room(fresh) and budget.allows(fresh, 100)  # its own share
    assert not budget.allows(fresh, 101)
    budget.charge(fresh, 100)
    assert not budget.room(fresh)
    budget.release(hogs[0], 400)
    assert budget.shared_used == 200 and budget.allows(fresh, 300)
    assert not budget.allows(fresh, 301)
    assert budget.used == 400


def test_one_connection_at_a_time_overdraws() -> None:
    from nbdluks.nbd.buffers import MemoryBudget

    budget = MemoryBudget(100)
    a, b = Acct(), Acct()
    woken: list[int] = []
    assert budget.overdraw(a) and budget.overdraw(a)
    assert not budget.overdraw(b)
    budget.wait(lambda: woken.append(1))
    budget.end_overdraft(b)  # not b's: nothing happens
    assert budget.overdraft is a and not woken
    budget.end_overdraft(a)
    assert woken == [1] and budget.overdraw(b)
