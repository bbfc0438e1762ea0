"""Structured logs for every process: one JSON object per line (``LOG_FORMAT=json``), or text for people.

Every line has ``timestamp`` (UTC, ISO 8601), ``level``, ``component`` (web, dispatcher, scheduler, flower,
agent, cli), ``job_id``, ``tenant_id``, ``logger`` and ``message`` (``null`` when unknown), then the
record's extra fields and ``exception``. The job and the tenant come from the call's ``extra=`` first, then
from what the running code bound with ``log_context``, then from the context providers: the control plane
adds the current HTTP request's, ``connect_celery`` the running task's (its id is ``<job_id>:<attempt>``).

Standard library only (Celery is imported by ``connect_celery`` alone), so that the agent can share it.
Handlers are installed by entry points only: ``configure_logging``, ``connect_celery``, ``logconfig_dict``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

LOG_FORMATS = ("json", "text")
FIELDS = ("timestamp", "level", "component", "job_id", "tenant_id", "logger", "message")
BAD_FORMAT = "LOG_FORMAT must be one of {formats}, got {value!r}"

Provider = Callable[[logging.LogRecord], Mapping[str, Any]]

_TASK_ID = re.compile(r"^(?P<job_id>[0-9a-fA-F-]{36}):\d+$")  # dispatch.contract.task_id(job_id, attempt)
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_DROPPED = frozenset({"data"})  # Celery's extra: the message's fields again, with the task's whole arguments
_EMPTY: Mapping[str, Any] = MappingProxyType({})
# The WSGI environ entry where the control plane leaves a request's tenant for the web server's access line, which
# is written after the app is done with the request (app.system.log_setup sets it, app.system.gunicorn reads it).
REQUEST_TENANT_KEY = "automation.tenant_id"
_context: ContextVar[Mapping[str, Any]] = ContextVar("automation_log_context", default=_EMPTY)
_providers: list[Provider] = []
_configured: dict[str, Any] = {"component": "app", "fmt": "json", "level": "INFO", "static": {}}
_task_tokens: dict[str, Token[Mapping[str, Any]]] = {}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Give every record logged inside the block these fields (``job_id``, ``tenant_id``, ...)."""
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def job_fields(job_id: str, tenant_id: str) -> dict[str, str]:
    """The ``extra`` of one line about a job that the code logging it is not running (a dispatcher's task, a final
    report carried by another job's claim)."""
    return {"job_id": job_id, "tenant_id": tenant_id}


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add fields to the current context until ``unbind(token)``; for code with separate start and end hooks."""
    return _context.set(MappingProxyType({**_context.get(), **fields}))


def unbind(token: Token[Mapping[str, Any]]) -> None:
    """Undo a ``bind``."""
    _context.reset(token)


def add_context_provider(provider: Provider) -> None:
    """Ask ``provider`` for fields of every record (once registered, it stays; registering twice is a no-op)."""
    if provider not in _providers:
        _providers.append(provider)


class ContextFilter(logging.Filter):
    """Give each record its component, job and tenant (and the providers' other fields) unless it has them."""

    def __init__(self, component: str = "app", **static: Any) -> None:
        super().__init__()
        self.component = component
        self.static = static

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields; never drops a record."""
        found: dict[str, Any] = {"component": self.component, **self.static}
        for provider in _providers:
            try:
                fields = provider(record)
            except Exception:  # noqa: S112 - a provider must never cost a log line (nor log, from a log filter)
                continue
            found.update({k: v for k, v in fields.items() if v is not None})
        found.update({k: v for k, v in _context.get().items() if v is not None})
        for key, value in found.items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the fields of ``FIELDS``, the record's extras, ``exception`` and ``stack``."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        payload: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "level": record.levelname,
            "component": getattr(record, "component", None),
            "job_id": getattr(record, "job_id", None),
            "tenant_id": getattr(record, "tenant_id", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in payload and key not in _DROPPED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-28T03:00:00.123Z INFO web app.jobs: message [job=… tenant=…]`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of text (and the traceback, if any)."""
        where = " ".join(
            f"{name}={value}"
            for name, value in (
                ("job", getattr(record, "job_id", None)),
                ("tenant", getattr(record, "tenant_id", None)),
            )
            if value is not None
        )
        line = (
            f"{_timestamp(record)} {record.levelname} {getattr(record, 'component', '-')} {record.name}: "
            f"{record.getMessage()}{f' [{where}]' if where else ''}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StderrHandler(logging.StreamHandler[TextIO]):
    """Write to the ``sys.stderr`` of the moment (a test's capture, a daemon's redirection) and mark it as ours."""

    def __init__(self) -> None:
        super().__init__()
        self.automation = True

    @property
    def stream(self) -> TextIO:
        """The current standard error."""
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def formatter(fmt: str) -> logging.Formatter:
    """Return the formatter of a ``LOG_FORMAT``, or raise ValueError."""
    if fmt not in LOG_FORMATS:
        raise ValueError(BAD_FORMAT.format(formats=", ".join(LOG_FORMATS), value=fmt))
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure_logging(*, component: str, level: str | int = "INFO", fmt: str = "json", **static: Any) -> None:
    """Send every log record of this process to standard error, structured; ``static`` fields go on every line.

    Replaces the handler an earlier call installed; leaves other handlers alone.
    """
    handler = StderrHandler()
    handler.setFormatter(formatter(fmt))
    handler.addFilter(ContextFilter(component, **static))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "automation", False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # urllib3 logs each request's path and query at DEBUG, where a workflow's secrets may be (an API key in a URL)
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))
    logging.captureWarnings(True)
    _configured.update(component=component, fmt=fmt, level=level, static=static)


def component_for(argv: Sequence[str]) -> str:
    """Name the platform process that ``argv`` started (Procfile names; ``cli`` for anything else)."""
    if argv and "gunicorn" in argv[0]:  # gunicorn's script, or python -m gunicorn (.../gunicorn/__main__.py)
        return "web"
    words = [os.path.basename(arg) for arg in argv]
    for word, component in (("flower", "flower"), ("beat", "scheduler"), ("worker", "dispatcher"), ("agent", "agent")):
        if word in words:
            return component
    return "cli"


def logconfig_dict(*, component: str, level: str = "INFO", fmt: str = "json") -> dict[str, Any]:
    """Return a ``logging.config.dictConfig`` configuration (gunicorn's ``logconfig_dict``) of this module's output."""
    formatter(fmt)  # refuse an unknown format before dictConfig does, with a clear message
    kind = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": f"{__name__}.ContextFilter", "component": component}},
        "formatters": {"structured": {"()": f"{__name__}.{kind.__name__}"}},
        "handlers": {
            "stderr": {"class": f"{__name__}.StderrHandler", "formatter": "structured", "filters": ["context"]}
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        },
    }


def _celery_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    """The job of Celery's own task lines (``Task workers.run_job[<job_id>:1] received``), logged outside the task."""
    args = record.args
    if isinstance(args, Mapping):
        match = _TASK_ID.match(str(args.get("id", "")))
        if match:
            return {"job_id": match["job_id"]}
    return _EMPTY


def _setup_celery_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Celery's ``setup_logging`` signal: keep our handler (Celery adds none of its own), at the worker's level."""
    configure_logging(
        component=_configured["component"],
        level=loglevel or _configured["level"],
        fmt=_configured["fmt"],
        **_configured["static"],
    )


def _task_started(task_id: str | None = None, kwargs: Mapping[str, Any] | None = None, **_: Any) -> None:
    match = _TASK_ID.match(task_id or "")
    job_id = match["job_id"] if match else (kwargs or {}).get("job_id")
    if task_id and job_id:
        _task_tokens[task_id] = bind(job_id=job_id)


def _task_finished(task_id: str | None = None, **_: Any) -> None:
    token = _task_tokens.pop(task_id or "", None)
    if token is not None:
        with suppress(ValueError):  # bound in another thread's context: nothing of ours is left here
            unbind(token)


def connect_celery() -> None:
    """In a Celery process: let this module's handler serve Celery's loggers, and tag task lines with the job."""
    from celery import signals

    signals.setup_logging.connect(_setup_celery_logging, weak=False, dispatch_uid="automation.logging.setup")
    signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="automation.logging.task_started")
    signals.task_postrun.connect(_task_finished, weak=False, dispatch_uid="automation.logging.task_finished")
    add_context_provider(_celery_fields)
