"""What a run returns: a TaskResult per task and a WorkflowResult, both serializable to JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum


class Status(StrEnum):
    """A task's or a workflow's outcome."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ERROR = "error"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


DEFAULT_OUTPUT_LIMIT = 64 * 1024
TRUNCATION_MARKER = "\n[... output truncated: {dropped} more bytes not shown ...]"
_HEAD, _TAIL = TRUNCATION_MARKER.split("{dropped}")
_MARKED = re.compile(re.escape(_HEAD) + r"(\d{1,18})" + re.escape(_TAIL) + r"\Z")


def utcnow() -> str:
    """Return the current time as an ISO 8601 UTC string with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cut_by_probe(output: str) -> tuple[str, int] | None:
    """The text before the truncation marker ``truncate`` ends ``output`` with, and the bytes the marker counts; None
    when it ends with none. A count of more than 18 digits is not ``truncate``'s: a task may print anything, and
    ``int()`` refuses 4300 digits."""
    found = _MARKED.search(output)
    return None if found is None else (output[: found.start()], int(found.group(1)))


def truncate(
    text: str, limit: int = DEFAULT_OUTPUT_LIMIT, dropped: int = 0, cut_end: Callable[[str], str] | None = None
) -> str:
    """Return ``text`` cut to ``limit`` bytes of UTF-8, with a visible marker when anything was dropped.

    ``dropped`` counts bytes the caller already discarded before ``text`` reached it. ``cut_end`` rewrites the end
    of text that was cut, before the marker (the redactor's mask for a secret cut off there).
    """
    data = text.encode("utf-8", "replace")
    if len(data) > limit:
        dropped += len(data) - limit
        text = data[:limit].decode("utf-8", "ignore")
    if dropped:
        text = (cut_end(text) if cut_end is not None else text) + TRUNCATION_MARKER.format(dropped=dropped)
    return text


@dataclass
class TaskResult:
    """The result of one task of a workflow."""

    name: str
    type: str
    status: Status
    output: str = ""
    error: str | None = None
    metrics: dict[str, object] = field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int = 0

    @property
    def success(self) -> bool:
        """True when the task succeeded."""
        return self.status is Status.SUCCEEDED

    def to_dict(self) -> dict[str, object]:
        """Return the result as a JSON-ready mapping."""
        return {
            "name": self.name,
            "type": self.type,
            "status": self.status.value,
            "success": self.success,
            "output": self.output,
            "error": self.error,
            "metrics": dict(self.metrics),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "attempts": self.attempts,
        }


@dataclass
class WorkflowResult:
    """The result of a whole workflow run: its status and every task's result in declared order."""

    name: str
    status: Status
    tasks: list[TaskResult]
    started_at: str
    duration_ms: int
    error: str | None = None

    @property
    def success(self) -> bool:
        """True when the workflow succeeded."""
        return self.status is Status.SUCCEEDED

    def task(self, name: str) -> TaskResult:
        """Return the result of the task called ``name``."""
        return next(t for t in self.tasks if t.name == name)

    def to_dict(self) -> dict[str, object]:
        """Return the result as a JSON-ready mapping."""
        return {
            "name": self.name,
            "status": self.status.value,
            "success": self.success,
            "error": self.error,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
            "tasks": [t.to_dict() for t in self.tasks],
        }

    def to_json(self, **kwargs: object) -> str:
        """Return the result as a JSON document."""
        return json.dumps(self.to_dict(), **kwargs)  # type: ignore[arg-type]
