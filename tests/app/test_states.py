"""The job state machine of DESIGN.md: exactly these transitions, nothing else."""

from __future__ import annotations

import itertools

import pytest

from app.jobs.states import ACTIVE_STATES, FINAL_STATES, JOB_TRANSITIONS, JobState, can_transition

J = JobState
ALLOWED = {
    (J.PENDING, J.QUEUED),
    (J.PENDING, J.CANCELLED),
    (J.PENDING, J.DEAD_LETTER),
    (J.QUEUED, J.RUNNING),
    (J.QUEUED, J.CANCELLED),
    (J.QUEUED, J.DEAD_LETTER),
    (J.RUNNING, J.COMPLETED),
    (J.RUNNING, J.FAILED),
    (J.RUNNING, J.TIMED_OUT),
    (J.RUNNING, J.CANCELLED),
    (J.RUNNING, J.QUEUED),
    (J.RUNNING, J.DEAD_LETTER),
    (J.DEAD_LETTER, J.QUEUED),  # requeued by an operator
}


def test_the_states_are_exactly_those_of_the_design() -> None:
    assert {s.value for s in JobState} == {
        "pending",
        "queued",
        "running",
        "completed",
        "failed",
        "timed_out",
        "cancelled",
        "dead_letter",
    }
    assert set(JOB_TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobState, JobState)), ids=lambda s: s.value)
def test_only_the_designed_transitions_are_legal(current: JobState, target: JobState) -> None:
    assert can_transition(current, target) == ((current, target) in ALLOWED)


def test_finished_states_are_final() -> None:
    assert {J.COMPLETED, J.FAILED, J.TIMED_OUT, J.CANCELLED, J.DEAD_LETTER} == FINAL_STATES
    assert {J.PENDING, J.QUEUED, J.RUNNING} == ACTIVE_STATES
