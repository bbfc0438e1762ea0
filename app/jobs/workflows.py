"""Validate submitted workflows with probe and choose the platform they can run on."""

from __future__ import annotations

import functools
import logging

import probe
from app.errors import PayloadTooLarge, Unprocessable

WORKFLOW_TOO_LARGE = "the workflow is {size} bytes; at most {limit} are accepted"
NO_PLATFORM = "no platform can run every task type of this workflow ({types})"
WRONG_PLATFORM = "platform '{platform}' cannot run this workflow; it runs on {allowed}"
DEFAULT_PLATFORM = "linux"
CACHED_BYTES = 16 * 1024  # validated workflows up to this size are remembered ...
CACHE_SIZE = 512  # ... this many of them, the least recently used forgotten first (at most 8 MiB)
UNREADABLE = "the workflow is invalid: it cannot be read as YAML ({error})"

log = logging.getLogger(__name__)


def validate_workflow(text: str, *, max_bytes: int) -> probe.Workflow:
    """Return the validated workflow, or raise 413 (too large) or 422 ``invalid_workflow`` with its line."""
    data = text.encode("utf-8")
    if len(data) > max_bytes:
        raise PayloadTooLarge(WORKFLOW_TOO_LARGE.format(size=len(data), limit=max_bytes))
    if len(data) <= CACHED_BYTES:
        return _validated(data)
    return _validate(data)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _validated(data: bytes) -> probe.Workflow:
    # The same workflow is submitted again and again (pipelines, schedules); a Workflow is immutable and
    # depends only on its text and the task types registered at start-up. Invalid ones are not cached.
    return _validate(data)


def _validate(data: bytes) -> probe.Workflow:
    try:
        # Bytes, never str: probe reads a one-line str ending in .yaml as a file path.
        return probe.load_workflow(data, name="workflow")
    except probe.WorkflowError as exc:
        raise Unprocessable(
            "the workflow is invalid:\n" + "\n".join(str(p) for p in exc.problems),
            code="invalid_workflow",
            line=exc.line,
            problems=[p.to_dict() for p in exc.problems],
        ) from None
    except Exception as exc:  # a validator that fails on some input must still answer 422, not 500
        log.warning("probe could not read a submitted workflow: %r", exc)
        raise Unprocessable(UNREADABLE.format(error=exc), code="invalid_workflow", line=None, problems=[]) from None


def allowed_platforms(workflow: probe.Workflow) -> frozenset[str]:
    """Return the platforms on which every task type of the workflow can run."""
    allowed = frozenset(probe.tasktype.ALL_PLATFORMS)
    for name in workflow.task_types:
        allowed &= probe.get_task_type(name).platforms
    return allowed


def choose_platform(workflow: probe.Workflow, requested: str | None) -> str:
    """Return the requested platform if the workflow can run there, else the default one it can run on."""
    allowed = allowed_platforms(workflow)
    if not allowed:
        raise Unprocessable(
            NO_PLATFORM.format(types=", ".join(sorted(workflow.task_types))), code="incompatible_platform"
        )
    if requested is not None:
        if requested not in allowed:
            raise Unprocessable(
                WRONG_PLATFORM.format(platform=requested, allowed=", ".join(sorted(allowed))),
                code="incompatible_platform",
            )
        return requested
    return DEFAULT_PLATFORM if DEFAULT_PLATFORM in allowed else sorted(allowed)[0]
