"""The agent's log shipping: real probe runs become log lines; LogBuffer batches them by size and age."""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import datetime
from typing import Any

import pytest

import probe
from tests.workers.support import no_threads_named
from workers import logship
from workers.logship import LogBuffer, lines_from_event

SECRET = "pa55-w0rd-very-secret"


def run(workflow: str, **kwargs: Any) -> tuple[probe.WorkflowResult, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    result = probe.run_workflow(probe.load_workflow(workflow.encode(), name="t"), on_event=events.append, **kwargs)
    return result, events


def shipped(events: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
    return [line for event in events for line in lines_from_event(event, **options)]


WORKFLOW = """\
name: three
tasks:
  - name: greet
    type: command
    config:
      command: "printf 'hello\\\\nworld\\\\n\\\\n'"
      shell: true
  - name: flaky
    type: command
    retries: 1
    retry_delay: 0s
    config:
      command: "echo broken {{.secrets.PASSWORD}} >&2; exit 3"
      shell: true
  - name: never
    type: command
    config:
      command: "true"
      shell: true
"""


def test_a_run_becomes_lines_for_the_workflow_each_task_its_output_and_its_retries() -> None:
    result, events = run(WORKFLOW, secrets={"PASSWORD": SECRET})
    assert result.status is probe.Status.FAILED
    lines = shipped(events)
    for line in lines:
        assert set(line) == {"ts", "task", "level", "message"} and line["level"] in ("info", "warning", "error")
        assert datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).tzinfo is not None
    said = [(line["task"], line["level"], line["message"]) for line in lines]
    assert said[0] == (None, "info", "workflow 'three' started: 3 tasks (greet, flaky, never)")
    assert said[1:5] == [
        ("greet", "info", "task started (command)"),
        ("greet", "info", "hello"),
        ("greet", "info", "world"),
        ("greet", "info", said[4][2]),
    ]
    assert said[4][2].startswith("task succeeded in ")
    flaky = [(level, message) for task, level, message in said if task == "flaky"]
    assert flaky[0] == ("info", "task started (command)")
    assert flaky[1] == ("info", "broken ***")  # each attempt's output, as it was read
    assert flaky[2] == ("warning", "attempt 1 failed: exit code 3 (expected 0): broken ***; retrying")
    assert flaky[3] == ("info", "task started (command, attempt 2)")
    assert flaky[4] == ("info", "broken ***")
    assert flaky[5][0] == "error" and flaky[5][1].startswith("task failed in ")
    assert flaky[6] == ("error", "error: exit code 3 (expected 0): broken ***")
    assert len(flaky) == 7
    assert not [s for s in said if s[0] == "never"]  # skipped without running: probe sends no event
    assert said[-1][0:2] == (None, "error") and said[-1][2].endswith(": task 'flaky' failed")
    assert not any(SECRET in message for _, _, message in said)


def test_a_tasks_log_lines_keep_their_level() -> None:
    _, events = run(
        "name: bg\ntasks:\n  - name: bg\n    type: command\n    config:\n"
        "      command: 'sleep 2 & echo hi'\n      shell: true\n"
    )
    lines = [line for line in shipped(events) if line["task"] == "bg"]
    assert ("warning", "background processes still holding the output were stopped when the command ended") in [
        (line["level"], line["message"]) for line in lines
    ]


def test_a_tasks_output_is_cut_to_its_line_budget_with_a_marker() -> None:
    _, events = run(
        "name: many\ntasks:\n  - name: count\n    type: command\n    config:\n      command: seq\n"
        "      args: ['1', '50']\n"
    )
    lines = [line["message"] for line in shipped(events, output_lines=10) if line["task"] == "count"]
    assert lines[1:11] == [str(n) for n in range(1, 11)]
    assert lines[11] == "[… 40 more lines of output not shipped; the task's result keeps its output]"
    assert lines[12].startswith("task succeeded")


def test_output_probe_cut_ends_with_how_many_lines_and_bytes_are_missing_not_a_claim_the_result_keeps_them() -> None:
    """``seq 1 200000`` prints 1.29 MB: probe keeps 64 KiB, and the line that cut it to its line budget counted
    only what was left of those 64 KiB, and said the result kept the output."""
    result, events = run(
        "name: big\ntasks:\n  - name: count\n    type: command\n    config:\n      command: seq\n"
        "      args: ['1', '200000']\n"
    )
    printed = sum(len(f"{n}\n") for n in range(1, 200001))
    kept = result.tasks[0].output.rsplit("\n[... output truncated", 1)[0]
    assert len(kept.encode()) == 65536
    lines = [line["message"] for line in shipped(events, output_lines=10) if line["task"] == "count"]
    assert lines[1:11] == [str(n) for n in range(1, 11)]
    assert lines[11] == (
        f"[… {len(kept.splitlines()) - 10} more lines of output not shipped, and {printed - 65536} more bytes were"
        " cut from it: the task's result keeps only its first 65536 bytes]"
    )


def task_says(lines: list[dict[str, Any]], task: str) -> list[str]:
    return [line["message"] for line in lines if line["task"] == task]


def when(line: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(line["ts"].replace("Z", "+00:00"))


def python_task(code: str, *, timeout: str | None = None) -> str:
    limit = f", timeout: {timeout}" if timeout else ""
    return (
        f"name: out\ntasks:\n  - {{name: talk, type: command{limit}, config: {{command: {sys.executable}, "
        f"args: ['-u', '-c', {code!r}]}}}}\n"
    )


def test_output_is_shipped_while_the_command_runs_each_line_once_with_the_time_it_was_read() -> None:
    """A command prints a line, sleeps, prints another: the buffer sends the first before the command ends."""
    sent: list[tuple[float, dict[str, Any]]] = []

    def send(batch: list[dict[str, Any]], first: int) -> None:
        sent.extend((time.monotonic(), line) for line in batch)

    buffer = LogBuffer(send, max_delay=0.1)
    workflow = python_task("import time; print('first'); time.sleep(1.5); print('second')")
    result = probe.run_workflow(
        probe.load_workflow(workflow.encode(), name="t"), on_event=lambda event: buffer.add(lines_from_event(event))
    )
    ended = time.monotonic()
    lines = [line for _, line in sent] + buffer.drain()
    assert result.success
    says = task_says(lines, "talk")
    assert says[:3] == ["task started (command)", "first", "second"]
    assert says[3].startswith("task succeeded in ") and len(says) == 4
    first = next(line for line in lines if line["message"] == "first")
    second = next(line for line in lines if line["message"] == "second")
    done = next(line for line in lines if line["message"].startswith("task succeeded"))
    assert next(at for at, line in sent if line is first) < ended - 1.0  # shipped while it ran
    assert (when(second) - when(first)).total_seconds() > 1.0
    assert (when(done) - when(first)).total_seconds() > 1.0


def test_a_timed_out_command_keeps_the_lines_shipped_while_it_ran_and_ships_none_twice() -> None:
    result, events = run(python_task("import time; print('before'); time.sleep(30)", timeout="1s"))
    assert result.tasks[0].status is probe.Status.TIMED_OUT and result.tasks[0].output == "before\n"
    lines = [line for line in shipped(events) if line["task"] == "talk"]
    says = [line["message"] for line in lines]
    assert says[:2] == ["task started (command)", "before"]
    assert says[2].startswith("task timed_out in ") and says[3] == "error: timed out (its timeout)"
    assert len(says) == 4
    assert (when(lines[2]) - when(lines[1])).total_seconds() > 0.5


def test_the_line_budget_holds_for_output_shipped_while_it_runs() -> None:
    code = "import time; [print(n) for n in range(1, 31)]; time.sleep(0.5); [print(n) for n in range(31, 51)]"
    _, events = run(python_task(code))
    lines = [line for line in shipped(events, output_lines=10) if line["task"] == "talk"]
    says = [line["message"] for line in lines]
    assert says[1:11] == [str(n) for n in range(1, 11)]
    assert says[11] == "[… 40 more lines of output not shipped; the task's result keeps its output]"
    assert says[12].startswith("task succeeded") and len(says) == 13
    assert (when(lines[12]) - when(lines[1])).total_seconds() > 0.4


def test_output_probe_cut_shipped_while_it_ran_ends_with_how_many_lines_and_bytes_are_missing() -> None:
    """``seq 1 1000`` is 3893 bytes: probe keeps 1000 of them, lines 1 to 277, of which 10 are shipped."""
    result, events = run(
        "name: big\ntasks:\n  - name: count\n    type: command\n    config:\n      command: seq\n"
        "      args: ['1', '1000']\n",
        output_limit=1000,
    )
    printed = sum(len(f"{n}\n") for n in range(1, 1001))
    says = task_says(shipped(events, output_lines=10), "count")
    assert says[1:11] == [str(n) for n in range(1, 11)]
    assert says[11] == (
        f"[… 267 more lines of output not shipped, and {printed - 1000} more bytes were cut from it: the task's result"
        " keeps only its first 1000 bytes]"
    )
    within = task_says(shipped(events), "count")
    assert within[1:-2] == [str(n) for n in range(1, 278)]
    assert within[-2] == f"[... output truncated: {printed - 1000} more bytes not shown ...]"
    assert within[-1].startswith("task succeeded") and result.tasks[0].output.endswith(within[-2])


def test_a_task_type_that_does_not_stream_ships_its_output_when_it_ends_as_before(http_server: Any) -> None:
    http_server.route("/health", body="all\ngood\n\n")
    _, events = run(
        'name: web\ntasks:\n  - {name: call, type: http, config: {url: "{{.BASE}}/health"}}\n',
        variables={"BASE": http_server.url},
    )
    lines = [line for line in shipped(events) if line["task"] == "call"]
    assert [line["message"] for line in lines[1:3]] == ["all", "good"]
    assert lines[3]["message"].startswith("task succeeded") and len(lines) == 4
    assert lines[1]["ts"] == lines[2]["ts"] == lines[3]["ts"]


def test_an_unknown_event_says_nothing() -> None:
    assert lines_from_event({"event": "something_new", "ts": "2026-11-28T10:00:00Z"}) == []


def line(n: int) -> dict[str, Any]:
    return {"ts": "2026-11-28T10:00:00Z", "task": "t", "level": "info", "message": f"line {n}"}


class Receiver:
    """A ``send`` that records batches and can be told to fail or to hold."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.called = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.fail = False
        self.tried: list[int] = []  # the number of each batch's first line, sent or not
        self.firsts: list[int] = []  # the same, of the batches delivered

    def __call__(self, lines: list[dict[str, Any]], first: int) -> None:
        self.tried.append(first)
        self.called.set()
        self.release.wait(30)
        if self.fail:
            raise ConnectionError("control plane unreachable")
        self.batches.append(list(lines))
        self.firsts.append(first)

    @property
    def sent(self) -> list[dict[str, Any]]:
        return [line for batch in self.batches for line in batch]


def test_a_full_batch_is_sent_at_once_and_the_rest_is_drained() -> None:
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=3, max_delay=600)
    buffer.add([line(1), line(2), line(3)])
    assert receiver.called.wait(10)
    buffer.add([line(4), line(5)])
    assert buffer.drain() == [line(4), line(5)]
    assert receiver.batches == [[line(1), line(2), line(3)]]


def test_lines_older_than_the_delay_are_sent_without_a_full_batch() -> None:
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=100, max_delay=0.05)
    buffer.add([line(1)])
    assert receiver.called.wait(10)
    assert buffer.drain() == [] and receiver.batches == [[line(1)]]


def test_a_short_job_sends_nothing_before_the_final_report() -> None:
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=100, max_delay=600)
    buffer.add([line(n) for n in range(5)])
    assert buffer.drain() == [line(n) for n in range(5)] and receiver.batches == []


def test_a_job_that_ends_before_its_lines_are_due_starts_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []

    class Counted(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    monkeypatch.setattr("workers.logship.threading.Thread", Counted)
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=100, max_delay=0.05)
    # Holding the alarm's lock, its thread cannot ring before the job ends, however slow this thread is. The lock
    # is reentrant (a Condition's default), so add() can still set the alarm under it.
    with logship._ALARM._changed:
        buffer.add([line(1)])
        buffer.add([line(2)])
        assert buffer.drain() == [line(1), line(2)]

    def remembered() -> bool:
        with logship._ALARM._changed:
            return any(entry[2] is buffer for entry in logship._ALARM._due)

    deadline = time.monotonic() + 5
    while remembered() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not remembered()  # once due, the alarm forgot the drained buffer: nothing more happens
    time.sleep(0.1)
    assert "logship" not in started and receiver.tried == []


def test_jobs_that_end_before_their_lines_are_due_wake_the_alarm_about_once_a_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alarm = logship._Alarm()
    monkeypatch.setattr(logship, "_ALARM", alarm)
    woken: list[float] = []

    class Counted(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            try:
                return super().wait(timeout)
            finally:
                woken.append(time.monotonic())

    alarm._changed = Counted()
    receivers = []
    for n in range(30):  # short jobs back to back, each with a line, each ended long before its line is due
        receiver = Receiver()
        receivers.append(receiver)
        buffer = LogBuffer(receiver, batch_lines=100, max_delay=0.3 if n == 0 else 5.0)
        buffer.add([line(n)])
        time.sleep(0.005)
        assert buffer.drain() == [line(n)]
    last_due = time.monotonic() + 5.0 - 0.5  # the last line's, less a margin
    # Woken by every job's line, the alarm would have woken 30 times by now.
    assert len(woken) <= 3, len(woken)

    def remembered() -> int:
        with alarm._changed:
            return len(alarm._due)

    # When the first line is due, the alarm forgets every drained buffer at once, long before the others are due.
    while remembered() and time.monotonic() < last_due:
        time.sleep(0.01)
    assert remembered() == 0 and len(woken) <= 4, len(woken)
    assert all(receiver.tried == [] for receiver in receivers)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork does not exist on Windows")
def test_in_a_forked_child_the_alarm_rings_each_buffer_when_due(monkeypatch: pytest.MonkeyPatch) -> None:
    alarm = logship._Alarm()
    monkeypatch.setattr(logship, "_ALARM", alarm)
    held = LogBuffer(Receiver(), batch_lines=100, max_delay=60)
    held.add([line(0)])  # the parent's alarm thread waits for it: the child inherits that wait, not the thread
    deadline = time.monotonic() + 5
    while not alarm._changed._waiters and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: two jobs one after the other, each with a line due in 0.05 s
        outcome = b"0"
        try:
            first, second = Receiver(), Receiver()
            LogBuffer(first, batch_lines=100, max_delay=0.05).add([line(1)])
            if first.called.wait(5):
                time.sleep(0.2)  # the child's alarm thread, its heap empty, waits to be woken
                LogBuffer(second, batch_lines=100, max_delay=0.05).add([line(2)])
                outcome = b"1" if second.called.wait(5) else b"2"
        finally:
            os.write(write, outcome)
            os._exit(0)
    os.close(write)
    try:
        outcome = os.read(read, 1)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
        held.drain()
    assert outcome == b"1", {b"0": "the first line was never sent", b"2": "the second line was never sent"}.get(outcome)


def test_each_buffer_is_sent_when_its_own_lines_are_due_whatever_the_others_wait_for() -> None:
    slow, quick = Receiver(), Receiver()
    waiting = LogBuffer(slow, batch_lines=100, max_delay=30)
    due_soon = LogBuffer(quick, batch_lines=100, max_delay=0.05)
    waiting.add([line(1)])  # its alarm is set first, for 30 s from now
    began = time.monotonic()
    due_soon.add([line(2)])
    assert quick.called.wait(10)
    assert time.monotonic() - began < 5 and slow.tried == []
    assert due_soon.drain() == [] and quick.batches == [[line(2)]]
    assert waiting.drain() == [line(1)]


def test_a_buffer_whose_thread_cannot_start_keeps_its_lines_and_the_alarm_rings_the_next(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    failing = LogBuffer(Receiver(), batch_lines=100, max_delay=0.01)
    monkeypatch.setattr(failing, "_start", lambda: (_ for _ in ()).throw(RuntimeError("can't start new thread")))
    failing.add([line(1)])
    receiver = Receiver()
    later = LogBuffer(receiver, batch_lines=100, max_delay=0.05)
    later.add([line(2)])
    assert receiver.called.wait(10)
    assert later.drain() == [] and receiver.batches == [[line(2)]]
    assert failing.drain() == [line(1)]
    assert "could not start sending a job's log lines" in caplog.text


def test_a_full_batch_whose_thread_cannot_start_waits_for_the_final_report(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=2, max_delay=60)
    no_threads_named(monkeypatch, "logship")
    buffer.add([line(1), line(2), line(3)])  # a full batch: its thread would start here
    buffer.add([line(4), line(5)])
    assert buffer.drain() == [line(n) for n in range(1, 6)] and receiver.batches == []
    assert caplog.text.count("could not start sending a job's log lines") == 1  # not tried again for each line


def test_an_alarm_that_cannot_start_leaves_the_lines_for_the_final_report(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(logship, "_ALARM", logship._Alarm())  # one that has not started its thread yet
    no_threads_named(monkeypatch, "logship-alarm")
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=100, max_delay=0.01)
    buffer.add([line(1)])
    assert buffer.drain() == [line(1)] and receiver.batches == []
    assert "could not start the log shipping alarm" in caplog.text


def test_a_failed_send_keeps_its_lines_for_the_final_report() -> None:
    receiver = Receiver()
    receiver.fail = True
    buffer = LogBuffer(receiver, batch_lines=2, max_delay=600)
    buffer.add([line(1), line(2), line(3)])
    assert receiver.called.wait(10)
    assert buffer.drain() == [line(1), line(2), line(3)] and receiver.batches == []


def test_drain_waits_for_the_send_in_flight_and_nothing_is_lost_or_sent_twice() -> None:
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=7, max_delay=0.01)
    adders = [
        threading.Thread(target=lambda k=k: [buffer.add([line(k * 1000 + n)]) for n in range(200)]) for k in range(4)
    ]
    for adder in adders:
        adder.start()
    for adder in adders:
        adder.join(30)
    receiver.release.clear()  # from now on a send holds until released
    receiver.called.clear()
    buffer.add([line(9999)])
    assert receiver.called.wait(10)  # a send is in flight, held
    drained: list[list[dict[str, Any]]] = []
    draining = threading.Thread(target=lambda: drained.append(buffer.drain()))
    draining.start()
    draining.join(0.2)
    assert draining.is_alive()  # drain() does not return while a batch is on its way
    receiver.release.set()
    draining.join(30)
    everything = receiver.sent + drained[0]
    expected = [f"line {k * 1000 + n}" for k in range(4) for n in range(200)] + ["line 9999"]
    assert sorted(x["message"] for x in everything) == sorted(expected)


def test_a_send_failing_while_drain_waits_gives_its_lines_to_drain() -> None:
    receiver = Receiver()
    receiver.release.clear()
    receiver.fail = True
    buffer = LogBuffer(receiver, batch_lines=2, max_delay=600)
    buffer.add([line(1), line(2), line(3)])
    assert receiver.called.wait(10)  # lines 1 and 2 are on their way, held, and will fail
    drained: list[list[dict[str, Any]]] = []
    draining = threading.Thread(target=lambda: drained.append(buffer.drain()))
    draining.start()
    receiver.release.set()
    draining.join(30)
    assert drained == [[line(1), line(2), line(3)]]


def test_the_per_job_bound_keeps_the_first_lines_and_marks_the_cut() -> None:
    receiver = Receiver()
    buffer = LogBuffer(receiver, batch_lines=100, max_delay=600, max_lines=5)
    buffer.add([line(n) for n in range(8)])
    lines = buffer.drain()
    assert lines[:5] == [line(n) for n in range(5)] and buffer.dropped == 3
    assert [x["level"] for x in lines[5:]] == ["warning", "warning"]
    assert lines[5]["message"].startswith("[log truncated on the agent: later lines are dropped; limit 5 lines")
    assert lines[6]["message"] == "[log truncated on the agent: 3 lines dropped in all]"


@pytest.mark.parametrize("size", [100, 1000])
def test_the_byte_bound_and_the_line_cut(size: int) -> None:
    buffer = LogBuffer(Receiver(), batch_lines=100, max_delay=600, max_bytes=250, line_max_bytes=size)
    buffer.add([{**line(1), "message": "é" * 100}, {**line(2), "message": "x" * 100}])
    lines = buffer.drain()
    if size == 100:  # each line is cut to 100 bytes, so both fit in 250
        assert [len(x["message"].encode()) <= 100 for x in lines] == [True, True]
        assert lines[0]["message"].endswith("more bytes]")
    else:  # 200 bytes of "é", then 100 more would pass 250
        assert lines[0]["message"] == "é" * 100 and buffer.dropped == 1


def test_batches_are_numbered_within_the_attempt_and_a_resend_keeps_its_numbers() -> None:
    receiver = Receiver()
    receiver.fail = True
    buffer = LogBuffer(receiver, batch_lines=2, max_delay=0.05)
    buffer.add([line(n) for n in range(1, 6)])
    assert receiver.called.wait(10)  # the first batch failed: it is kept, and sent again with the same number
    receiver.fail = False
    deadline = time.monotonic() + 10
    while len(receiver.batches) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert receiver.batches[:2] == [[line(1), line(2)], [line(3), line(4)]]
    assert receiver.firsts[:2] == [1, 3] and receiver.tried[0] == receiver.tried[1] == 1
    assert buffer.drain() == [line(5)] and buffer.first_pending == 5


def test_each_attempt_of_a_retried_task_has_its_own_line_budget_and_says_what_it_lacks() -> None:
    """The result keeps the last attempt's output: its lines get the task's budget, and an earlier attempt over it
    says so in its own words before its retry."""
    workflow = (
        "name: again\ntasks:\n  - name: count\n    type: command\n    retries: 1\n    retry_delay: 0s\n"
        "    config:\n      command: 'seq 1 15; exit 3'\n      shell: true\n"
    )
    result, events = run(workflow)
    assert result.tasks[0].attempts == 2
    says = task_says(shipped(events, output_lines=10), "count")
    tens = [str(n) for n in range(1, 11)]
    assert says[1:12] == [*tens, "[… 5 more lines of attempt 1's output not shipped]"]
    assert says[12].startswith("attempt 1 failed") and says[13] == "task started (command, attempt 2)"
    assert says[14:25] == [*tens, "[… 5 more lines of output not shipped; the task's result keeps its output]"]
