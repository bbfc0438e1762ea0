"""When the agent's consumer sends the task events it buffered (``workers.consumer.Pacer``), on a given clock."""

from __future__ import annotations

from workers.consumer import Pacer


def test_an_event_after_a_quiet_moment_is_sent_at_once() -> None:
    pacer = Pacer(0.1)
    assert pacer.plan(5.0) == 0.0
    assert pacer.plan(5.2) == 0.0  # the last sending was longer ago than the interval


def test_events_soon_after_a_sending_wait_for_one_timer_due_an_interval_after_it() -> None:
    pacer = Pacer(0.1)
    assert pacer.plan(5.0) == 0.0
    delay = pacer.plan(5.03)
    assert delay is not None and abs(delay - 0.07) < 1e-9
    assert pacer.plan(5.05) is None  # the timer already set will send this one too
    assert pacer.plan(5.09) is None
    pacer.sent(5.1)  # the timer fired
    delay = pacer.plan(5.12)
    assert delay is not None and abs(delay - 0.08) < 1e-9  # a new timer, an interval after that sending


def test_a_timer_that_never_fired_holds_events_back_no_longer_than_the_interval() -> None:
    pacer = Pacer(0.1)
    assert pacer.plan(5.0) == 0.0
    assert pacer.plan(5.03) is not None  # a timer is set for 5.1, and lost (the broker connection restarted)
    assert pacer.plan(5.08) is None
    assert pacer.plan(5.15) == 0.0  # past its time: sent at once, with what the lost timer held
    assert pacer.plan(5.17) is not None  # and timers are set again
