"""The probe package's exceptions: one root, each class says when it is raised."""

from __future__ import annotations

from dataclasses import dataclass


class ProbeError(Exception):
    """Raised for every error the probe engine reports; the root of the package's exceptions."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: where it is (a path such as ``tasks[2] (deploy).config``), what, and the YAML line."""

    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        at = f" (line {self.line})" if self.line else ""
        return f"{where}{self.message}{at}"

    def to_dict(self) -> dict[str, object]:
        """Return the problem as a JSON-ready mapping."""
        return {"path": self.path, "message": self.message, "line": self.line}


class WorkflowError(ProbeError):
    """Raised when a workflow document is invalid; carries every problem found, each with its place and line."""

    def __init__(self, problems: list[Problem] | Problem | str, source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.source = source
        super().__init__(self.describe())

    def describe(self) -> str:
        """Return every problem on a line of its own, prefixed with the source file when known."""
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(prefix + str(p) for p in self.problems)

    @property
    def line(self) -> int | None:
        """The line of the first problem that has one."""
        return next((p.line for p in self.problems if p.line), None)


class TaskError(ProbeError):
    """Raised by a task type when its work could not be done at all (connection refused, bad rendered option).

    The task ends with status ``error``; ``output`` and ``metrics`` keep whatever was gathered before the error.
    """

    def __init__(self, message: str, *, output: str = "", metrics: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.output = output
        self.metrics = dict(metrics or {})


class TaskStopped(ProbeError):
    """Raised inside a task when its work was stopped because it timed out or was cancelled.

    ``output`` keeps what the work wrote before it was stopped (``truncated_bytes`` counts what it read and did
    not keep): how far a hung command got is what an operator needs to see.
    """

    def __init__(self, reason: str = "stopped", *, output: str = "", truncated_bytes: int = 0) -> None:
        super().__init__(reason)
        self.output = output
        self.truncated_bytes = truncated_bytes


class UnknownTaskType(ProbeError, KeyError):
    """Raised when a task type name is not registered; the message suggests the closest registered name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown task type"


class DuplicateTaskType(ProbeError):
    """Raised when two task types register under the same name."""
