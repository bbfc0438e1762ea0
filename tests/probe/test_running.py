"""Running workflows: order, failures, retries, timeouts, cancellation, templates, secrets and events."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import psutil
import pytest

import probe
from probe.results import TRUNCATION_MARKER
from probe.tasktype import Option, Outcome, TaskContext, TaskType, registry

PY = sys.executable


def test_tasks_run_in_order_and_results_serialize_to_json(run_yaml):
    result = run_yaml(
        f"""\
        name: order
        tasks:
          - name: first
            type: command
            config: {{command: {PY}, args: ["-c", "print('one')"]}}
          - name: second
            type: command
            config: {{command: {PY}, args: ["-c", "print('two')"]}}
        """
    )
    assert result.success and result.status is probe.Status.SUCCEEDED
    assert [t.output for t in result.tasks] == ["one\n", "two\n"]
    data = json.loads(result.to_json())
    assert data["tasks"][0]["status"] == "succeeded" and data["tasks"][0]["success"] is True
    assert data["tasks"][0]["metrics"]["exit_code"] == 0
    assert isinstance(data["tasks"][0]["metrics"]["duration_ms"], int)
    assert data["tasks"][0]["started_at"].endswith("Z") and data["tasks"][0]["attempts"] == 1
    assert set(data) >= {"name", "status", "success", "tasks", "started_at", "duration_ms"}


def test_a_failed_task_stops_the_workflow_and_the_rest_are_skipped(run_yaml):
    result = run_yaml(
        """\
        name: stop
        tasks:
          - {name: ok, type: command, config: {command: "true"}}
          - {name: bad, type: command, config: {command: "false"}}
          - {name: never, type: command, config: {command: "true"}}
        """
    )
    assert result.status is probe.Status.FAILED
    assert [t.status.value for t in result.tasks] == ["succeeded", "failed", "skipped"]
    assert result.tasks[1].error == "exit code 1 (expected 0)"
    assert result.tasks[2].attempts == 0


def test_continue_on_error_lets_the_workflow_go_on(run_yaml):
    result = run_yaml(
        """\
        name: tolerate
        tasks:
          - {name: bad, type: command, continue_on_error: true, config: {command: "false"}}
          - {name: after, type: command, config: {command: "true"}}
        """
    )
    assert result.success
    assert [t.status.value for t in result.tasks] == ["failed", "succeeded"]


def test_retries_rerun_a_failed_task_after_the_delay(run_yaml, tmp_path):
    counter = tmp_path / "count"
    script = (
        f"import pathlib,sys; p=pathlib.Path({str(counter)!r}); n=len(p.read_text()) if p.exists() else 0; "
        "p.write_text('x'*(n+1)); sys.exit(0 if n >= 2 else 1)"
    )
    started = time.monotonic()
    result = run_yaml(
        f"""\
        name: retry
        tasks:
          - name: flaky
            type: command
            retries: 3
            retry_delay: 200ms
            config: {{command: {PY}, args: ["-c", {json.dumps(script)}]}}
        """
    )
    assert result.success
    assert result.tasks[0].attempts == 3
    assert counter.read_text() == "xxx"
    assert time.monotonic() - started >= 0.4


def test_retries_give_up_after_the_last_attempt(run_yaml):
    result = run_yaml("name: r\ntasks:\n  - {name: a, type: command, retries: 2, config: {command: 'false'}}\n")
    assert result.tasks[0].status is probe.Status.FAILED and result.tasks[0].attempts == 3


def _processes_running(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_a_sleep_30_with_a_one_second_timeout_ends_quickly_and_leaves_no_process(run_yaml):
    marker = "probe-timeout-marker-7781"
    started = time.monotonic()
    result = run_yaml(
        f"""\
        name: slow
        tasks:
          - name: sleepy
            type: command
            timeout: 1s
            config:
              command: "sleep 30 # {marker}"
              shell: true
        """
    )
    took = time.monotonic() - started
    assert result.tasks[0].status is probe.Status.TIMED_OUT
    assert result.status is probe.Status.FAILED
    assert "timed out" in (result.tasks[0].error or "")
    assert took < 3
    time.sleep(0.2)
    assert _processes_running(marker) == []


def test_a_timeout_kills_grandchildren_too(run_yaml, tmp_path):
    marker = "probe-grandchild-marker-5521"
    sleeper = f"{PY} -c 'import time; time.sleep(30)' {marker}"
    result = run_yaml(
        f"""\
        name: tree
        tasks:
          - name: tree
            type: command
            timeout: 500ms
            config:
              command: "{sleeper} & {sleeper} & wait"
              shell: true
        """
    )
    assert result.tasks[0].status is probe.Status.TIMED_OUT
    time.sleep(0.2)
    assert _processes_running(marker) == []


def test_the_workflow_timeout_bounds_the_whole_run(run_yaml):
    started = time.monotonic()
    result = run_yaml(
        """\
        name: bounded
        timeout: 1s
        tasks:
          - {name: a, type: command, config: {command: sleep, args: ["0.3"]}}
          - {name: b, type: command, config: {command: sleep, args: ["30"]}}
          - {name: c, type: command, config: {command: "true"}}
        """
    )
    assert time.monotonic() - started < 3
    assert result.status is probe.Status.TIMED_OUT
    assert [t.status.value for t in result.tasks] == ["succeeded", "timed_out", "skipped"]
    assert "workflow's timeout" in (result.tasks[1].error or "")


def test_a_run_time_timeout_shortens_the_workflow_timeout(run_yaml):
    result = run_yaml(
        "name: t\ntasks:\n  - {name: a, type: command, config: {command: sleep, args: ['30']}}\n", timeout=0.5
    )
    assert result.status is probe.Status.TIMED_OUT


def test_cancel_stops_the_running_task_and_cancels_the_rest(run_yaml):
    cancel = threading.Event()

    def on_event(event: dict) -> None:  # cancel 0.2 s into the long task, however long "ok" took
        if event["event"] == "task_started" and event["task"] == "long":
            threading.Timer(0.2, cancel.set).start()

    started = time.monotonic()
    result = run_yaml(
        """\
        name: cancel
        tasks:
          - {name: ok, type: command, config: {command: "true"}}
          - {name: long, type: command, config: {command: sleep, args: ["30"]}}
          - {name: later, type: command, config: {command: "true"}}
        """,
        cancel=cancel,
        on_event=on_event,
    )
    assert time.monotonic() - started < 2.5
    assert result.status is probe.Status.CANCELLED
    assert [t.status.value for t in result.tasks] == ["succeeded", "cancelled", "cancelled"]


def test_cancel_during_a_retry_delay_stops_waiting(run_yaml):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    result = run_yaml(
        "name: c\ntasks:\n  - {name: a, type: command, retries: 5, retry_delay: 30s, config: {command: 'false'}}\n",
        cancel=cancel,
    )
    assert time.monotonic() - started < 2
    assert result.tasks[0].status is probe.Status.CANCELLED


def test_variables_resolve_run_time_first_then_workflow_then_environment(run_yaml):
    result = run_yaml(
        f"""\
        name: vars
        variables:
          A: from-workflow
          B: from-workflow
        tasks:
          - name: show
            type: command
            config:
              command: {PY}
              args: ["-c", "import sys; print(sys.argv[1:])", "{{{{.A}}}}", "{{{{ .B }}}}", "{{{{.C}}}}"]
        """,
        variables={"A": "from-run"},
        env={"B": "from-env", "C": "from-env"},
    )
    assert result.tasks[0].output == "['from-run', 'from-workflow', 'from-env']\n"


def test_a_variable_without_a_value_is_an_error_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    workflow = probe.load_workflow(
        f"name: v\ntasks:\n  - {{name: a, type: command, config: {{command: touch, args: ['{marker}']}}}}\n"
        "  - name: b\n    type: command\n    config:\n      command: '{{.NOPE}}'\n"
    )
    with pytest.raises(probe.WorkflowError) as info:
        probe.run_workflow(workflow, env={})
    assert str(info.value) == (
        "tasks[1] (b).config.command: variable 'NOPE' is not defined: give it at run time, under variables, "
        "or in the environment (line 7)"
    )
    assert not marker.exists()


def test_a_missing_secret_is_an_error_before_anything_runs():
    workflow = probe.load_workflow(
        "name: s\ntasks:\n  - {name: a, type: command, config: {command: echo, args: ['{{.secrets.TOKEN}}']}}\n"
    )
    with pytest.raises(probe.WorkflowError, match="secret 'TOKEN' was not given"):
        probe.run_workflow(workflow)


def test_earlier_task_output_and_metrics_feed_later_tasks(run_yaml):
    result = run_yaml(
        f"""\
        name: chain
        tasks:
          - name: produce
            type: command
            config: {{command: {PY}, args: ["-c", "print('v42', end='')"]}}
          - name: consume
            type: command
            config:
              command: echo
              args: ["{{{{.tasks.produce.output}}}}", "code={{{{.tasks.produce.metrics.exit_code}}}}"]
        """
    )
    assert result.tasks[1].output == "v42 code=0\n"


def test_an_unknown_metric_fails_the_task_that_uses_it(run_yaml):
    result = run_yaml(
        """\
        name: chain
        tasks:
          - {name: a, type: command, config: {command: "true"}}
          - {name: b, type: command, config: {command: echo, args: ["{{.tasks.a.metrics.nope}}"]}}
        """
    )
    assert result.tasks[1].status is probe.Status.ERROR
    assert "task 'a' has no metric 'nope'" in (result.tasks[1].error or "")


def test_a_whole_string_placeholder_keeps_its_type(run_yaml):
    result = run_yaml(
        """\
        name: typed
        tasks:
          - name: a
            type: command
            config: {command: "false", expected_exit_codes: ["{{.CODE}}"]}
        """,
        variables={"CODE": 1},
    )
    assert result.success


def test_secrets_are_masked_in_output_errors_metrics_and_events(run_yaml):
    events: list[dict] = []
    secret = "hunter2-very-secret"
    result = run_yaml(
        f"""\
        name: secret
        tasks:
          - name: leak
            type: command
            continue_on_error: true
            config:
              command: {PY}
              args: ["-c", "import sys; print('pw=' + sys.argv[1]); sys.stderr.write(sys.argv[1]); sys.exit(3)",
                     "{{{{.secrets.PW}}}}"]
        """,
        secrets={"PW": secret},
        on_event=events.append,
    )
    task = result.tasks[0]
    assert task.output.startswith("pw=***")
    assert task.error == "exit code 3 (expected 0): ***"
    assert secret not in result.to_json()
    assert secret not in json.dumps(events)


def test_a_secret_cut_off_in_stdout_is_masked_though_stderr_follows(run_yaml):
    # stdout is cut at the limit in the middle of the secret; stderr comes after it, and the joined output is cut
    # back to the limit, which leaves the secret's beginning at the end
    secret = "TOPSECRETVALUE"
    result = run_yaml(
        f"""\
        name: cut
        tasks:
          - name: cut
            type: command
            config:
              command: {PY}
              args: ["-c", "import sys; sys.stdout.write('a' * 94 + sys.argv[1]); sys.stderr.write('oops')",
                     "{{{{.secrets.S}}}}"]
        """,
        secrets={"S": secret},
        output_limit=100,
    )
    shown = result.tasks[0].output
    assert shown.startswith("a" * 94 + "***") and "TOPSEC" not in shown, shown


def test_output_is_bounded_with_a_visible_marker(run_yaml):
    result = run_yaml(
        f"""\
        name: big
        tasks:
          - name: big
            type: command
            config: {{command: {PY}, args: ["-c", "import sys; sys.stdout.write('x' * 300000)"]}}
        """,
        output_limit=1000,
    )
    output = result.tasks[0].output
    assert output.startswith("x" * 1000)
    assert TRUNCATION_MARKER.format(dropped=299000) in output
    assert len(output) < 1200


def test_events_are_sent_as_each_task_starts_and_finishes(run_yaml):
    events: list[dict] = []
    run_yaml(
        """\
        name: ev
        tasks:
          - {name: a, type: command, config: {command: "true"}}
          - {name: b, type: command, config: {command: "false"}}
          - {name: c, type: command, config: {command: "true"}}
        """,
        on_event=events.append,
    )
    kinds = [(e["event"], e.get("task")) for e in events]
    assert kinds == [
        ("workflow_started", None),
        ("task_started", "a"),
        ("task_finished", "a"),
        ("task_started", "b"),
        ("task_finished", "b"),
        ("workflow_finished", None),
    ]
    assert events[4]["status"] == "failed" and events[4]["result"]["metrics"]["exit_code"] == 1
    assert events[-1]["status"] == "failed"
    json.dumps(events)


def test_a_failing_event_callback_never_breaks_the_run(run_yaml):
    def explode(event: dict) -> None:
        raise RuntimeError("boom")

    result = run_yaml("name: e\ntasks:\n  - {name: a, type: command, config: {command: 'true'}}\n", on_event=explode)
    assert result.success


class _Stubborn(TaskType):
    """A task that ignores being stopped, to prove the engine does not wait for it forever."""

    name = "test-stubborn"
    options = {"seconds": Option("number", default=10)}

    def run(self, config: dict, ctx: TaskContext) -> Outcome:
        time.sleep(config["seconds"])
        return Outcome(True)


class _Crashing(TaskType):
    """A task type with a bug (whose message shows its option ``say``, as exceptions often show their input)."""

    name = "test-crashing"
    options = {"say": Option("string", default="oops")}

    def run(self, config: dict, ctx: TaskContext) -> Outcome:
        raise ZeroDivisionError(config["say"])


MEETING: list[threading.Barrier] = []  # where test-where tasks with ``meet`` wait for each other


class _Where(TaskType):
    """A task that says which thread ran it, after waiting ``seconds`` (or, with ``meet``, for the others)."""

    name = "test-where"
    options = {"seconds": Option("number", default=0), "meet": Option("boolean", default=False)}

    def run(self, config: dict, ctx: TaskContext) -> Outcome:
        if config["meet"]:
            MEETING[0].wait(10)
        time.sleep(config["seconds"])
        return Outcome(True, str(threading.get_ident()))


@pytest.fixture
def test_types():
    registry.add(_Stubborn)
    registry.add(_Crashing)
    registry.add(_Where)
    yield
    registry.pop("test-stubborn")
    registry.pop("test-crashing")
    registry.pop("test-where")


def test_a_task_that_ignores_its_timeout_is_abandoned_after_a_grace_period(run_yaml, test_types):
    started = time.monotonic()
    result = run_yaml("name: s\ntasks:\n  - {name: a, type: test-stubborn, timeout: 200ms, config: {seconds: 5}}\n")
    assert time.monotonic() - started < 3.5
    assert result.tasks[0].status is probe.Status.TIMED_OUT
    assert "abandoned" in (result.tasks[0].error or "")


def test_a_bug_in_a_task_type_is_an_error_result_not_a_crash(run_yaml, test_types):
    result = run_yaml("name: s\ntasks:\n  - {name: a, type: test-crashing}\n")
    assert result.tasks[0].status is probe.Status.ERROR
    assert "ZeroDivisionError" in (result.tasks[0].error or "")


def test_the_traceback_of_a_bug_in_a_task_type_is_logged_with_secrets_masked(run_yaml, test_types, caplog):
    workflow = "name: s\ntasks:\n  - {name: a, type: test-crashing, config: {say: 'key={{.secrets.K}}'}}\n"
    with caplog.at_level("ERROR", logger="probe"):
        result = run_yaml(workflow, secrets={"K": "sekrit-value-1"})
    assert result.tasks[0].error == "internal error in task type 'test-crashing': ZeroDivisionError('key=***')"
    [record] = [r for r in caplog.records if r.name == "probe.runner"]
    shown = record.getMessage() + (record.exc_text or "")
    assert "ZeroDivisionError: key=***" in shown and "Traceback" in shown, shown
    assert "sekrit-value-1" not in caplog.text and not record.exc_info


def thread_of(result: probe.WorkflowResult) -> int:
    return int(result.tasks[0].output)


def test_runs_one_after_another_reuse_the_thread_of_the_last_and_never_an_abandoned_one(run_yaml, test_types):
    where = "name: w\ntasks:\n  - {name: a, type: test-where}\n"
    first, second = thread_of(run_yaml(where)), thread_of(run_yaml(where))
    assert first == second != threading.get_ident()  # a run's tasks run on a worker thread, kept for the next run
    stuck = run_yaml(
        "name: s\ntasks:\n  - {name: a, type: test-where}\n"
        "  - {name: b, type: test-stubborn, timeout: 200ms, config: {seconds: 3}}\n"
    )
    assert thread_of(stuck) == first and stuck.tasks[-1].status is probe.Status.TIMED_OUT
    after = thread_of(run_yaml(where))
    assert after != first  # that thread is still stuck in the abandoned task: a new one runs the next run
    assert thread_of(run_yaml(where)) == after


def test_runs_at_the_same_time_each_have_a_thread_of_their_own(run_yaml, test_types, monkeypatch):
    monkeypatch.setattr(f"{__name__}.MEETING", [threading.Barrier(3)])  # no run ends before all three run
    where = "name: w\ntasks:\n  - {name: a, type: test-where, config: {meet: true}}\n"
    threads: list[int] = []
    runs = [threading.Thread(target=lambda: threads.append(thread_of(run_yaml(where)))) for _ in range(3)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(set(threads)) == 3


def test_a_forked_child_runs_workflows_on_threads_of_its_own(run_yaml):
    quick = "name: q\ntasks:\n  - {name: a, type: command, timeout: 5s, config: {command: 'true'}}\n"
    assert run_yaml(quick).success  # the parent now keeps an idle task thread, which a child does not inherit
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its run succeeds
        try:
            os._exit(0 if run_yaml(quick).success else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's run hung")
