"""Run a validated workflow: tasks in order, each on a supervised thread that timeouts and cancels can stop."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from probe.errors import TaskError, TaskStopped, WorkflowError
from probe.outputlines import LiveOutput
from probe.redact import Redactor
from probe.results import DEFAULT_OUTPUT_LIMIT, Status, TaskResult, WorkflowResult, truncate, utcnow
from probe.tasktype import Outcome, TaskContext
from probe.templates import Scope, TemplateError
from probe.workflow import TaskSpec, Workflow

log = logging.getLogger(__name__)

EventCallback = Callable[[dict[str, Any]], None]

ABORT_GRACE = 2.0  # seconds a stopped task gets to return before it is abandoned
CANCEL_POLL = 0.05
FAILING = (Status.FAILED, Status.ERROR, Status.TIMED_OUT)
IDLE_WORKERS = 8  # threads of finished runs kept for the next ones (a process that runs many workflows, an agent)


class _Worker:
    """A thread that runs one task at a time for a workflow run; replaced when a task has to be abandoned.

    A run takes an idle worker left by an earlier run when there is one (``take``) and gives it back when it ends
    (``give_back``): starting a thread costs about as much CPU as running a short command does.
    """

    _idle: list[_Worker] = []
    _idle_lock = threading.Lock()

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[tuple[Callable[[], Outcome], dict[str, Any], threading.Event] | None]
        self.jobs = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="probe-worker", daemon=True)
        self.thread.start()

    @classmethod
    def take(cls) -> _Worker:
        """An idle worker, or a new one."""
        with cls._idle_lock:
            if cls._idle:
                return cls._idle.pop()
        return cls()

    def give_back(self) -> None:
        """Keep this worker, whose run has ended with no task left on it, for another run (or let it end)."""
        with self._idle_lock:
            if len(self._idle) < IDLE_WORKERS:
                self._idle.append(self)
                return
        self.close()

    @classmethod
    def forget_idle(cls) -> None:
        """In a forked child: the idle workers' threads were not copied, so none of them can be taken."""
        cls._idle = []
        cls._idle_lock = threading.Lock()

    def _loop(self) -> None:
        while (item := self.jobs.get()) is not None:
            work, box, done = item
            try:
                box["outcome"] = work()
            except BaseException as exc:  # reported as the task's error, never lost
                box["error"] = exc
            finally:
                done.set()

    def submit(self, work: Callable[[], Outcome]) -> tuple[dict[str, Any], threading.Event]:
        """Start ``work``; returns where its outcome or exception will be and the event set when it ends."""
        box: dict[str, Any] = {}
        done = threading.Event()
        self.jobs.put((work, box, done))
        return box, done

    def close(self) -> None:
        """Let the thread end once its current work is done."""
        self.jobs.put(None)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_Worker.forget_idle)


def run_workflow(
    workflow: Workflow,
    *,
    variables: Mapping[str, Any] | None = None,
    secrets: Mapping[str, Any] | None = None,
    cancel: threading.Event | None = None,
    on_event: EventCallback | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
) -> WorkflowResult:
    """Run every task of ``workflow`` in order and return the result.

    Parameters:
        workflow: a workflow from ``load_workflow``.
        variables: values given at run time; they win over the workflow's variables and the environment.
        secrets: values for ``{{.secrets.NAME}}``; each is replaced by ``***`` in everything returned.
        cancel: set it (from any thread) to stop the running task and cancel the rest.
        on_event: called with a JSON-ready event when the workflow and each task starts and finishes, for each
            log line a task writes, and (``task_output``) for the lines of output a task reads as it runs, masked as
            its result's; the ``task_finished`` of a task that sent any says how many (``streamed_lines``) and how
            many bytes it read and did not send (``unstreamed_bytes``).
        env: the environment placeholders may read (default: the process environment).
        timeout: a limit for the whole run, shorter than the workflow's own.
        output_limit: bytes of output kept per task (default 64 KiB).

    Raises:
        WorkflowError: a placeholder names a variable or secret that has no value (nothing has run).
    """
    env = dict(os.environ) if env is None else env  # read once: decoding os.environ costs at each read
    secrets = {k: str(v) for k, v in (secrets or {}).items()}
    problems = workflow.missing_values(variables, secrets, env)
    if problems:
        raise WorkflowError(problems, workflow.source)
    run = _Run(workflow, variables or {}, secrets, env, cancel, on_event, timeout, output_limit)
    return run.execute()


class _Run:
    """The state of one workflow run."""

    def __init__(
        self,
        workflow: Workflow,
        variables: Mapping[str, Any],
        secrets: dict[str, str],
        env: Mapping[str, str],
        cancel: threading.Event | None,
        on_event: EventCallback | None,
        timeout: float | None,
        output_limit: int,
    ) -> None:
        self.workflow = workflow
        self.cancel = cancel
        self.on_event = on_event
        self.output_limit = output_limit
        self.redactor = Redactor(secrets.values())
        self.results: dict[str, dict[str, Any]] = {}
        outside = Scope({**env, **variables}, secrets)
        values = {**env, **{k: outside.render(v) for k, v in workflow.variables.items()}, **variables}
        self.scope = Scope(values, secrets, self.results)
        limit = workflow.timeout if timeout is None else min(timeout, workflow.timeout)
        self.started = time.monotonic()
        self.deadline = self.started + limit
        self.worker: _Worker | None = None

    def emit(self, event: str, **fields: Any) -> None:
        """Send one event to the callback; a failing callback is logged and never stops the run."""
        if self.on_event is None:
            return
        payload = {"event": event, "workflow": self.workflow.name, "ts": utcnow(), **fields}
        try:
            self.on_event(payload)
        except Exception:
            log.exception("on_event callback failed for %s", event)

    def execute(self) -> WorkflowResult:
        try:
            return self._execute()
        finally:
            if self.worker is not None:
                self.worker.give_back()

    def _execute(self) -> WorkflowResult:
        started_at = utcnow()
        self.emit("workflow_started", tasks=[t.name for t in self.workflow.tasks])
        results: list[TaskResult] = []
        status = Status.SUCCEEDED
        error: str | None = None
        for spec in self.workflow.tasks:
            if status is not Status.SUCCEEDED:
                left = Status.CANCELLED if status is Status.CANCELLED else Status.SKIPPED
                results.append(TaskResult(spec.name, spec.type, left))
                continue
            result = self.run_task(spec)
            results.append(result)
            self.results[spec.name] = {
                "output": result.output,
                "error": result.error,
                "status": result.status.value,
                "metrics": result.metrics,
            }
            if result.status is Status.CANCELLED:
                status, error = Status.CANCELLED, "the run was cancelled"
            elif time.monotonic() >= self.deadline and result.status is Status.TIMED_OUT:
                status, error = Status.TIMED_OUT, f"the workflow timed out during task '{spec.name}'"
            elif result.status in FAILING and not spec.continue_on_error:
                status, error = Status.FAILED, f"task '{spec.name}' {result.status.value}"
        duration_ms = int((time.monotonic() - self.started) * 1000)
        outcome = WorkflowResult(self.workflow.name, status, results, started_at, duration_ms, error)
        self.emit("workflow_finished", status=status.value, error=error, duration_ms=duration_ms)
        return outcome

    def run_task(self, spec: TaskSpec) -> TaskResult:
        """Run one task with its retries and return its (redacted) result."""
        started_at, start = utcnow(), time.monotonic()
        attempts = 0
        live = None
        if self.on_event is not None:
            live = LiveOutput(
                self.redactor,
                lambda stream, lines, first: self.emit(
                    "task_output", task=spec.name, stream=stream, lines=lines, first=first
                ),
            )
        while True:
            attempts += 1
            self.emit("task_started", task=spec.name, type=spec.type, index=spec.index, attempt=attempts)
            outcome, status = self.attempt(spec, live)
            retry = status in FAILING and attempts <= spec.retries and not self._cancelled()
            if retry and status is Status.TIMED_OUT and time.monotonic() >= self.deadline:
                retry = False
            if not retry:
                break
            self.emit(
                "task_retrying",
                task=spec.name,
                index=spec.index,
                attempt=attempts,
                status=status.value,
                error=self.redactor.text(outcome.error or ""),
                **(live.sent() if live else {}),  # what this attempt's lines lack: the result holds the next one's
            )
            if not self._sleep(spec.retry_delay):
                status, outcome = Status.CANCELLED, Outcome(False, outcome.output, "cancelled while waiting to retry")
                break
        metrics = dict(self.redactor.value(outcome.metrics))
        metrics["duration_ms"] = int((time.monotonic() - start) * 1000)
        # cut_end: the text may end, once cut to the limit, in the middle of a secret, wherever the process's
        # streams were cut before (stdout cut mid-secret, then stderr)
        output = truncate(
            self.redactor.text(outcome.output), self.output_limit, outcome.truncated_bytes, self.redactor.cut_text
        )
        result = TaskResult(
            name=spec.name,
            type=spec.type,
            status=status,
            output=output,
            error=self.redactor.text(outcome.error) if outcome.error else None,
            metrics=metrics,
            started_at=started_at,
            finished_at=utcnow(),
            attempts=attempts,
        )
        if live is not None:
            self.emit(
                "task_finished",
                task=spec.name,
                type=spec.type,
                index=spec.index,
                status=status.value,
                result=result.to_dict(),
                **live.sent(),
            )
        return result

    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def _sleep(self, seconds: float) -> bool:
        """Wait before a retry; False when the run was cancelled meanwhile."""
        end = min(time.monotonic() + seconds, self.deadline)
        while (left := end - time.monotonic()) > 0:
            if self.cancel is not None:
                if self.cancel.wait(min(left, CANCEL_POLL * 4)):
                    return False
            else:
                time.sleep(left)
        return not self._cancelled()

    def attempt(self, spec: TaskSpec, live: LiveOutput | None = None) -> tuple[Outcome, Status]:
        """Render the task's options, run it once under supervision (its output lines sent through ``live`` as they
        come), and classify the outcome."""
        if self._cancelled():
            return Outcome(False, error="cancelled before it started"), Status.CANCELLED
        task_type = spec.task_type()
        try:
            config = self.prepare(spec, task_type.options)
        except (TemplateError, ValueError) as exc:
            return Outcome(False, error=str(exc)), Status.ERROR
        instance = task_type()
        problems = instance.check(config)
        if problems:
            return Outcome(False, error="; ".join(problems)), Status.ERROR
        now = time.monotonic()
        deadline = self.deadline
        if spec.timeout is not None:
            deadline = min(deadline, now + spec.timeout)
        if isinstance(config.get("timeout"), (int, float)) and "timeout" in task_type.options:
            deadline = min(deadline, now + float(config["timeout"]))
        output = live.attempt() if live is not None else None
        ctx = TaskContext(
            task=spec.name,
            deadline=deadline,
            output_limit=self.output_limit,
            emit_log=lambda level, message: self.emit(
                "task_log", task=spec.name, level=level, message=self.redactor.text(message)
            ),
            emit_output=output,
        )
        with output if output is not None else contextlib.nullcontext():
            return self.supervise(spec, instance.run, config, ctx)

    def prepare(self, spec: TaskSpec, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return the task's options rendered, converted to their kinds, with defaults filled in."""
        config: dict[str, Any] = {}
        for key, option in options.items():
            raw = spec.config.get(key)
            if raw is None:
                if option.default is not None:
                    config[key] = option.default
                continue
            value = self.scope.render(raw)
            try:
                config[key] = option.coerce(value)
            except ValueError as exc:
                raise ValueError(f"option '{key}': {exc}") from None
        return config

    def supervise(
        self,
        spec: TaskSpec,
        work: Callable[[dict[str, Any], TaskContext], Outcome],
        config: dict[str, Any],
        ctx: TaskContext,
    ) -> tuple[Outcome, Status]:
        """Run ``work`` on its own thread; stop it at its deadline or on cancel; classify what happened."""
        if self.worker is None:
            self.worker = _Worker.take()
        box, done = self.worker.submit(lambda: work(config, ctx))
        while True:
            left = ctx.deadline - time.monotonic()
            if left <= 0:
                ctx.abort("timed_out")
                break
            wait = min(left, CANCEL_POLL) if self.cancel is not None else left
            if done.wait(wait):
                break
            if self._cancelled():
                ctx.abort("cancelled")
                break
        abandoned = not done.wait(ABORT_GRACE) if ctx.stop.is_set() else False
        if abandoned and self.worker is not None:
            self.worker.close()  # it is stuck in the abandoned task; the next task gets a new thread
            self.worker = None
        return self.classify(spec, box, ctx, abandoned)

    def classify(
        self, spec: TaskSpec, box: dict[str, Any], ctx: TaskContext, abandoned: bool
    ) -> tuple[Outcome, Status]:
        outcome = box.get("outcome")
        error = box.get("error")
        partial = Outcome(False)
        if isinstance(error, TaskError):
            partial = Outcome(False, error.output, error.message, error.metrics)
        elif isinstance(error, TaskStopped):
            partial = Outcome(False, error.output, truncated_bytes=error.truncated_bytes)
        if ctx.stop_reason is not None:
            late = f"; the task did not stop within {ABORT_GRACE:.0f}s and was abandoned" if abandoned else ""
            base = outcome if isinstance(outcome, Outcome) else partial
            if ctx.stop_reason == "cancelled":
                stopped = Outcome(False, base.output, f"cancelled{late}", base.metrics, base.truncated_bytes)
                return stopped, Status.CANCELLED
            which = "the workflow's timeout" if ctx.deadline >= self.deadline else "its timeout"
            stopped = Outcome(False, base.output, f"timed out ({which}){late}", base.metrics, base.truncated_bytes)
            return stopped, Status.TIMED_OUT
        if isinstance(outcome, Outcome):
            return outcome, Status.SUCCEEDED if outcome.ok else Status.FAILED
        if isinstance(error, TaskError):
            return partial, Status.ERROR
        if isinstance(error, TaskStopped):
            return Outcome(False, error="stopped"), Status.ERROR
        # the traceback is logged masked: its messages may hold rendered options, secrets among them
        trace = self.redactor.text("".join(traceback.format_exception(error)).rstrip())
        log.error("task %s (%s) raised:\n%s", spec.name, spec.type, trace)
        return Outcome(False, error=f"internal error in task type '{spec.type}': {error!r}"), Status.ERROR
