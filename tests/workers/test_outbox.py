"""The outbox: final reports delivered by threads of their own, bounded, flushed, drained at exit."""

from __future__ import annotations

import threading
import time

import pytest

from dispatch.logs import ContextFilter
from tests.workers.support import no_threads_named
from workers.outbox import FinalReport, Outbox


class Gate:
    """A delivery that records each report and, while closed, holds it."""

    def __init__(self, *, open_: bool = True) -> None:
        self.delivered: list[str] = []
        self.threads: set[str] = set()
        self.opened = threading.Event()
        self.started = threading.Event()
        if open_:
            self.opened.set()

    def __call__(self, report: FinalReport) -> None:
        self.started.set()
        assert self.opened.wait(10)
        self.threads.add(threading.current_thread().name)
        self.delivered.append(report.job_id)


def report(job_id: str) -> FinalReport:
    return FinalReport(job_id, 1, "completed", None)


def in_thread(target: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_put_returns_before_the_report_is_delivered_and_another_thread_delivers_it() -> None:
    gate = Gate(open_=False)
    outbox = Outbox(gate, limit=1)
    outbox.put(report("j1"))
    assert gate.started.wait(5) and gate.delivered == []
    gate.opened.set()
    outbox.flush(5)  # not asserted: the woken thread may be done before this call (flush then returns False)
    assert gate.delivered == ["j1"] and gate.threads == {"agent-reports-0"}


def test_with_one_thread_reports_are_delivered_in_the_order_they_were_handed_over() -> None:
    gate = Gate()
    outbox = Outbox(gate, limit=1)
    for n in range(20):
        outbox.put(report(f"j{n}"))
    outbox.flush(5)
    assert gate.delivered == [f"j{n}" for n in range(20)]


def test_put_blocks_while_limit_reports_are_unfinished() -> None:
    gate = Gate(open_=False)
    outbox = Outbox(gate, limit=2)
    outbox.put(report("j1"))
    outbox.put(report("j2"))
    third = in_thread(outbox.put, report("j3"))
    third.join(0.3)
    assert third.is_alive()  # j1 is being delivered and j2 waits: no room for j3
    gate.opened.set()
    third.join(5)
    assert not third.is_alive()
    outbox.flush(5)
    assert sorted(gate.delivered) == ["j1", "j2", "j3"]


def test_a_report_that_hangs_holds_up_only_its_own_thread() -> None:
    held = threading.Event()
    delivered: list[str] = []

    def deliver(item: FinalReport) -> None:
        if item.job_id == "stuck":
            assert held.wait(10)
        delivered.append(item.job_id)

    outbox = Outbox(deliver, limit=2)
    outbox.put(report("stuck"))
    outbox.put(report("j1"))
    outbox.put(report("j2"))  # j1 is done: there is room again
    assert wait_for(lambda: delivered == ["j1", "j2"])
    held.set()
    outbox.flush(5)
    assert delivered == ["j1", "j2", "stuck"]


def wait_for(check: object, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_flush_waits_only_for_the_reports_handed_over_before_it() -> None:
    first, second, begun = threading.Event(), threading.Event(), threading.Event()
    delivered: list[str] = []

    def deliver(item: FinalReport) -> None:
        if item.job_id == "j1":
            begun.set()
        assert (first if item.job_id == "j1" else second).wait(10)
        delivered.append(item.job_id)

    outbox = Outbox(deliver, limit=2)
    outbox.put(report("j1"), linger=60)  # only the flush makes it due
    flushed: list[bool] = []
    flusher = in_thread(lambda: flushed.append(outbox.flush(5)))
    assert begun.wait(5)  # so the flush has begun, and knows what it waits for: j1
    outbox.put(report("j2"))  # handed over after the flush began: not waited for
    first.set()
    flusher.join(5)
    assert flushed == [True] and delivered == ["j1"]
    assert outbox.flush(0.1) is False  # j2 is still held: not delivered within the timeout
    second.set()
    outbox.flush(5)
    assert delivered == ["j1", "j2"]


def test_flush_waits_for_every_report_and_says_whether_there_was_one() -> None:
    gate = Gate(open_=False)
    outbox = Outbox(gate)
    assert outbox.flush(1) is False
    outbox.put(report("j1"))
    started = time.monotonic()
    threading.Timer(0.2, gate.opened.set).start()
    assert outbox.flush(5) is True
    assert gate.delivered == ["j1"] and time.monotonic() - started >= 0.15


def test_a_report_whose_delivery_fails_does_not_stop_the_next(caplog: pytest.LogCaptureFixture) -> None:
    delivered: list[str] = []

    def deliver(item: FinalReport) -> None:
        if item.job_id == "bad":
            raise RuntimeError("boom")
        delivered.append(item.job_id)

    caplog.handler.addFilter(ContextFilter("agent"))  # what the agent's log handlers apply
    outbox = Outbox(deliver)
    outbox.put(report("bad"))
    outbox.put(report("good"))
    outbox.flush(5)
    assert delivered == ["good"]
    [failed] = [r for r in caplog.records if r.getMessage() == "job bad: delivering the final state completed failed"]
    assert failed.job_id == "bad"  # type: ignore[attr-defined]  # its own job, in a thread that runs none


def test_close_delivers_what_was_handed_over_then_later_reports_are_delivered_by_their_caller() -> None:
    gate = Gate(open_=False)
    outbox = Outbox(gate, limit=2)
    outbox.put(report("j1"))
    outbox.put(report("j2"))
    threading.Timer(0.2, gate.opened.set).start()
    assert outbox.close(5) is True
    assert sorted(gate.delivered) == ["j1", "j2"]
    outbox.put(report("j3"))  # a task that ended during the shutdown: delivered before put returns
    assert gate.delivered[-1] == "j3"
    assert "MainThread" in gate.threads


def test_a_put_waiting_for_room_when_the_outbox_closes_delivers_its_report_itself() -> None:
    gate = Gate(open_=False)
    outbox = Outbox(gate, limit=1)
    outbox.put(report("j1"))
    second = in_thread(outbox.put, report("j2"))
    second.join(0.2)
    assert second.is_alive()  # no room: j1 is being delivered
    closing = in_thread(outbox.close, 5)
    threading.Timer(0.2, gate.opened.set).start()
    second.join(5)
    closing.join(5)
    assert not second.is_alive() and not closing.is_alive()
    assert sorted(gate.delivered) == ["j1", "j2"]


def test_close_gives_up_after_its_timeout_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    gate = Gate(open_=False)
    outbox = Outbox(gate)
    outbox.put(report("j1"))
    assert outbox.close(0.2) is False
    assert "1 final reports were not delivered before the agent stopped" in caplog.text
    gate.opened.set()


def test_a_lingering_report_taken_for_a_claim_is_never_delivered_by_a_thread() -> None:
    gate = Gate()
    outbox = Outbox(gate, limit=2)
    outbox.put(report("j1"), linger=60)
    outbox.put(report("j2"), linger=60)
    taken = outbox.take(1)
    assert [r.job_id for _, r in taken] == ["j1"] and outbox.take(5, lambda _, r: r.job_id == "j9") == []
    outbox.settle(taken)
    assert outbox.flush(5) is True  # j2 is hurried; j1 was settled by its claim
    assert gate.delivered == ["j2"]


def test_reports_given_back_are_delivered_by_the_threads_oldest_first() -> None:
    gate = Gate()
    outbox = Outbox(gate, limit=3)
    for n in range(3):
        outbox.put(report(f"j{n}"), linger=60)
    outbox.back(outbox.take(2))  # the claim that carried j0 and j1 failed
    waited = 0.0
    while len(gate.delivered) < 2 and waited < 30:  # without a flush: given back means due now
        time.sleep(0.01)
        waited += 0.01
    assert gate.delivered == ["j0", "j1"]
    outbox.flush(5)
    assert gate.delivered == ["j0", "j1", "j2"]


def test_a_taken_report_counts_until_it_is_settled() -> None:
    outbox = Outbox(Gate(), limit=1)
    outbox.put(report("j1"), linger=60)
    taken = outbox.take(1)
    waiting = in_thread(outbox.put, report("j2"))
    waiting.join(0.2)
    assert waiting.is_alive()  # j1, carried by a claim not answered yet, still holds the outbox's one place
    outbox.settle(taken)
    waiting.join(5)
    assert not waiting.is_alive()
    assert outbox.close(5) and outbox.take(1) == []


def test_back_to_back_reports_taken_by_claims_wake_the_delivery_thread_about_once_a_linger() -> None:
    gate = Gate()
    outbox = Outbox(gate, limit=1)
    looks: list[float | None] = []
    wait = outbox._wait

    def counted(seconds: float | None) -> None:
        looks.append(seconds)
        wait(seconds)

    outbox._wait = counted  # type: ignore[method-assign]
    began = time.monotonic()
    for n in range(30):  # a busy agent: each report lingers, and the next job's claim takes it
        outbox.put(report(f"j{n}"), linger=2.0)
        time.sleep(0.005)
        outbox.settle(outbox.take(1))
    spent = time.monotonic() - began
    # Woken by every put, the thread would have looked again 30 times; a put due later than its next look wakes it
    # no more: it looked when the first report came, and waits for that report's linger to end.
    assert len(looks) <= 4 + 2 * (spent / 2.0), looks
    assert outbox.close(5) and gate.delivered == []


def test_a_report_due_now_is_not_held_up_by_an_older_one_that_lingers() -> None:
    gate = Gate()
    outbox = Outbox(gate, limit=2)
    outbox.put(report("lingers"), linger=60)
    outbox.put(report("due"))
    waited = 0.0
    while not gate.delivered and waited < 30:  # without a flush, which would hurry both
        time.sleep(0.01)
        waited += 0.01
    assert gate.delivered == ["due"]
    outbox.flush(5)
    assert gate.delivered == ["due", "lingers"]


def test_a_report_with_no_thread_to_deliver_it_is_delivered_by_its_caller(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()
    outbox = Outbox(gate, limit=2)
    with monkeypatch.context() as patched:
        no_threads_named(patched, "agent-reports")
        outbox.put(report("j1"))  # delivered before put returns, on this thread
        assert gate.delivered == ["j1"] and gate.threads == {threading.current_thread().name}
    assert "could not start a thread to deliver final reports" in caplog.text
    outbox.put(report("j2"))  # threads start again once the system has room
    outbox.flush(5)
    assert gate.delivered == ["j1", "j2"] and gate.threads - {threading.current_thread().name} <= {
        "agent-reports-0",
        "agent-reports-1",
    }
    assert len(gate.threads) == 2  # j2 by a delivery thread
