"""A connection's flow control, driven directly: the in-flight cap, the
memory budget, and when reading pauses."""

from __future__ import annotations

from nbdluks.nbd.buffers import BufferPool, MemoryBudget
from nbdluks.nbd.constants import Cmd
from nbdluks.nbd.flow import REQUEST_OVERHEAD, Flow, cost
from nbdluks.nbd.wire import Request

KiB = 1024


class Transport:
    """Records what flow control asks of the reading side."""

    def __init__(self) -> None:
        self.paused = False
        self.calls: list[str] = []
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.paused = False
        self.calls.append("resume")


def flow(max_inflight: int = 1 << 20, budget: int = 1 << 20) -> tuple[Flow, list[int]]:
    wakes: list[int] = []
    return Flow(max_inflight, MemoryBudget(budget), BufferPool(budget),
                lambda: wakes.append(1)), wakes


def read(length: int) -> Request:
    return Request(0, Cmd.READ, 1, 0, length)


def test_tiny_requests_count_against_the_cap_too() -> None:
    assert cost(Request(0, Cmd.FLUSH, 1, 0, 1 << 30)) == REQUEST_OVERHEAD
    assert cost(read(64 * KiB)) == REQUEST_OVERHEAD + 64 * KiB
    f, _ = flow(max_inflight=4 * REQUEST_OVERHEAD)
    flushes = [Request(0, Cmd.FLUSH, i, 0, 0) for i in range(4)]
    for req in flushes:
        assert f.may_start(req)
        f.started(req)
    assert f.inflight == 4 and f.gated
    assert not f.may_start(Request(0, Cmd.FLUSH, 9, 0, 0))
    f.finished(flushes[0])
    assert f.inflight == 3 and not f.gated


def test_replies_the_client_does_not_take_gate_new_work() -> None:
    f, _ = flow()
    f.pause_writing()
    assert f.gated and not f.may_start(read(4 * KiB))
    f.resume_writing()
    assert f.may_start(read(4 * KiB))


def test_a_read_buffer_stays_charged_until_its_reply_has_left() -> None:
    f, _ = flow()
    req = read(100 * KiB)
    f.started(req)
    assert req.buffer is not None and len(req.buffer) == 128 * KiB  # its size class
    assert f.budget.used == 128 * KiB
    f.finished(req)
    f.give_back(req)
    assert req.buffer is None
    assert f.budget.used == 128 * KiB  # the transport may still hold the reply
    f.release_unsent()
    assert f.budget.used == 0
    f.started(req2 := read(100 * KiB))
    f.finished(req2)
    f.give_back(req2)
    f.resume_writing()  # below the low-water mark: as good as sent
    assert f.budget.used == 0


def test_write_data_is_charged_as_it_arrives_and_released_once_written() -> None:
    f, _ = flow()
    f.data_in(1)
    f.data_in(64 * KiB - 1)
    assert f.budget.used == f.held == 64 * KiB
    req = Request(0, Cmd.WRITE, 1, 0, 64 * KiB, data=bytearray(64 * KiB))
    f.give_back(req)
    assert req.data is None and f.budget.used == 0
    f.data_in(8 * KiB)
    f.drop_partial(8 * KiB)  # the stream ended inside a WRITE's data
    f.drop_partial(0)
    assert f.budget.used == 0


def test_a_read_waits_for_the_budget_and_is_woken() -> None:
    f, wakes = flow(budget=256 * KiB)
    f.started(first := read(256 * KiB))
    assert not f.may_start(read(4 * KiB))
    assert not wakes
    f.finished(first)
    f.give_back(first)
    f.release_unsent()
    assert wakes == [1]
    assert f.may_start(read(4 * KiB))


def test_alone_a_read_larger_than_the_budget_still_runs() -> None:
    f, _ = flow(budget=64 * KiB)
    assert f.may_start(read(1 << 20))


def test_reading_pauses_and_resumes_once_per_change() -> None:
    f, _ = flow(max_inflight=8 * KiB)
    t = Transport()
    f.update_reading(t, hold=False, mid_write=False)
    assert t.calls == []  # reading already
    f.update_reading(t, hold=True, mid_write=False)  # closing, or a backlog
    f.update_reading(t, hold=True, mid_write=False)
    assert t.calls == ["pause"] and f.read_paused
    f.update_reading(t, hold=False, mid_write=False)
    assert t.calls == ["pause", "resume"] and not f.read_paused
    f.started(req := read(8 * KiB))  # the cap
    f.update_reading(t, hold=False, mid_write=False)
    assert t.paused
    f.finished(req)
    f.update_reading(t, hold=False, mid_write=False)
    assert not t.paused


def test_no_room_pauses_reading_unless_a_write_is_half_in_one_at_a_time() -> None:
    budget = MemoryBudget(64 * KiB)  # one connection: 32 KiB reserve, 32 KiB shared
    wakes: list[str] = []
    pool = BufferPool(0)
    f = Flow(1 << 20, budget, pool, lambda: wakes.append("f"))
    g = Flow(1 << 20, budget, pool, lambda: wakes.append("g"))
    t, u = Transport(), Transport()
    f.data_in(64 * KiB)
    assert not budget.room(f)
    f.update_reading(t, hold=False, mid_write=True)  # must arrive: let the rest come
    assert not t.paused and not wakes and budget.overdraft is f
    g.data_in(64 * KiB)
    g.update_reading(u, hold=False, mid_write=True)  # one overdraft at a time
    assert u.paused
    f.update_reading(t, hold=False, mid_write=False)  # f's WRITE is in
    assert t.paused and budget.overdraft is None and wakes == ["g"]
    g.update_reading(u, hold=False, mid_write=True)
    assert not u.paused and budget.overdraft is g
    g.drop_partial(64 * KiB)  # g is gone
    assert budget.overdraft is None
    f.give_back(Request(0, Cmd.WRITE, 1, 0, 64 * KiB, data=bytearray(64 * KiB)))
    assert "f" in wakes  # told when room is made, to read again
    f.update_reading(t, hold=False, mid_write=False)
    assert not t.paused


def test_a_client_that_leaves_the_server_waiting_is_noticed() -> None:
    f, _ = flow()
    t = Transport()
    assert f.stalled(100.0, 30, mid_write=True, received_at=80.0) is None
    assert f.stalled(111.0, 30, mid_write=True, received_at=80.0) == "WRITE data stalled"
    assert f.stalled(111.0, 30, mid_write=False, received_at=80.0) is None
    f.update_reading(t, hold=True, mid_write=True)  # paused by us: not the client's doing
    assert f.stalled(111.0, 30, mid_write=True, received_at=80.0) is None
    f.update_reading(t, hold=False, mid_write=True)  # the clock starts again
    assert f.stalled(f.read_resumed_at + 29, 30, mid_write=True, received_at=80.0) is None
    f.pause_writing()
    assert f.stalled(f.write_paused_at + 29, 30, False, 0.0) is None
    assert f.stalled(f.write_paused_at + 31, 30, False, 0.0) == "replies not read"
    f.resume_writing()
    assert f.stalled(f.write_paused_at + 31, 30, False, f.write_paused_at + 31) is None


def test_a_closing_or_missing_transport_is_left_alone() -> None:
    f, _ = flow()
    f.update_reading(None, hold=True, mid_write=False)
    t = Transport()
    t.closing = True
    f.update_reading(t, hold=True, mid_write=False)
    assert t.calls == [] and not f.read_paused
