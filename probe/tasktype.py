"""The task-type contract: options, the context a task runs in, its outcome, and the registry of types.

A task type is a class with a ``name``, declared ``options`` and a ``run`` method, registered with
``@register``. Built-in types live one module each under ``probe/tasks/``; other packages add theirs through
the entry-point group ``probe.tasks`` (each entry point names a TaskType subclass).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar

from probe.durations import parse_duration
from probe.errors import DuplicateTaskType, TaskStopped, UnknownTaskType

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "probe.tasks"
ALL_PLATFORMS = frozenset({"linux", "darwin", "windows"})

# Option kinds, as `probe tasks` shows them.
KINDS = ("string", "integer", "number", "boolean", "duration", "list", "mapping", "any")


@dataclass(frozen=True)
class Option:
    """One option a task type accepts in its ``config``.

    ``kind`` is one of KINDS, or several joined with ``|`` (``"string|list"``); ``items`` is the kind of a
    list's items; ``choices`` limits the values.
    """

    kind: str = "string"
    required: bool = False
    default: Any = None
    help: str = ""
    items: str | None = None
    choices: tuple[Any, ...] = ()

    def coerce(self, value: Any) -> Any:
        """Return ``value`` converted to this option's kind.

        Raises:
            ValueError: the value is not of this kind; the message says what was expected.
        """
        errors = []
        for kind in self.kind.split("|"):
            try:
                result = _coerce(kind, value)
            except ValueError as exc:
                errors.append(str(exc))
                continue
            if kind == "list" and self.items:
                result = [self._item(index, item) for index, item in enumerate(result)]  # a list: its item is wrong
            if self.choices and result not in self.choices:
                raise ValueError(f"must be one of {', '.join(map(str, self.choices))}, got {value!r}")
            return result
        if len(errors) == 1:
            raise ValueError(errors[0])
        raise ValueError(f"expected {' or '.join(self.kind.split('|'))}, got {_kind_of(value)}")

    def _item(self, index: int, item: Any) -> Any:
        try:
            return _coerce(str(self.items), item)
        except ValueError as exc:  # its own words: a duration's says what it could not read
            raise ValueError(f"item {index} of the list: {exc}") from None


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return "null" if value is None else type(value).__name__


def _coerce(kind: str, value: Any) -> Any:
    """Convert one value to one kind; strings that came from templates convert to numbers and booleans."""
    if kind == "any":
        return value
    if kind == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind == "number":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif kind == "duration":
        return parse_duration(value)
    elif kind == "list":
        if isinstance(value, list):
            return value
    elif kind == "mapping":
        if isinstance(value, dict):
            return value
    else:
        raise ValueError(f"unknown option kind {kind!r}")
    raise ValueError(f"expected {kind}, got {_kind_of(value)}")


@dataclass
class Outcome:
    """What a task's ``run`` returns: whether it succeeded, its output, an error message and its metrics.

    ``ok=False`` means the work ran and its check failed (a non-zero exit, an unexpected status code);
    the task's status is then ``failed``. Work that could not be done at all raises TaskError instead.
    """

    ok: bool
    output: str = ""
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    truncated_bytes: int = 0  # output the task read but did not keep; the engine shows a marker


class TaskContext:
    """What a running task may ask of the engine: its deadline, whether to stop, a way to be stopped, a log, and
    where to hand its output line by line as it reads it.

    The engine calls every callback given to ``on_abort`` when the task times out or is cancelled, from
    another thread; a task registers there whatever really stops its work (kill a process group, close a
    socket or an SSH channel, interrupt a query).
    """

    def __init__(
        self,
        *,
        task: str,
        deadline: float,
        output_limit: int,
        emit_log: Callable[[str, str], None] | None = None,
        emit_output: Callable[..., None] | None = None,
    ) -> None:
        self.task = task
        self.deadline = deadline
        self.output_limit = output_limit
        self.stop = threading.Event()
        self.stop_reason: str | None = None
        self._aborts: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._emit_log = emit_log
        self._emit_output = emit_output

    @property
    def streaming(self) -> bool:
        """Whether someone listens to the output as it comes (without, a task need not cut its output into lines)."""
        return self._emit_output is not None

    def remaining(self) -> float:
        """Seconds left before the task's deadline (never negative)."""
        return max(0.0, self.deadline - time.monotonic())

    def on_abort(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Register ``callback`` to stop the work; returns a function that unregisters it.

        When the task is already stopping, the callback runs at once.
        """
        with self._lock:
            if not self.stop.is_set():
                self._aborts.append(callback)
                return lambda: self._discard(callback)
        _call_quietly(callback)
        return lambda: None

    def _discard(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._aborts:
                self._aborts.remove(callback)

    def abort(self, reason: str) -> None:
        """Stop the task: record why (``timed_out`` or ``cancelled``) and run every abort callback once."""
        with self._lock:
            if self.stop.is_set():
                return
            self.stop_reason = reason
            self.stop.set()
            callbacks, self._aborts = self._aborts, []
        for callback in callbacks:
            _call_quietly(callback)

    def check(self, *, output: str = "", truncated_bytes: int = 0) -> None:
        """Raise TaskStopped when the task must stop, keeping the ``output`` the work had so far in its result."""
        if self.stop.is_set():
            raise TaskStopped(self.stop_reason or "stopped", output=output, truncated_bytes=truncated_bytes)

    def log(self, message: str, level: str = "info") -> None:
        """Emit a log line of the workflow (the platform streams and stores these)."""
        if self._emit_log is not None:
            self._emit_log(level, message)

    def output(self, stream: str, lines: list[str], *, last: bool = False, dropped: int = 0) -> None:
        """Hand over complete lines of output ``stream`` as the work reads them; the engine masks secrets in them as
        in the final output and sends them to its listener. A task that hands its output over this way returns the
        same output, kept, in its Outcome: the platform's log shows the lines handed over, not that output again.

        Parameters:
            stream: ``stdout`` or ``stderr``.
            lines: the lines, without their line breaks.
            last: this call ends the stream: ``lines`` may end with one that had no line break, and later calls for
                the stream are ignored.
            dropped: with ``last``, the bytes of the stream not kept (after the lines).
        """
        if self._emit_output is not None:
            self._emit_output(stream, lines, last=last, dropped=dropped)


def _call_quietly(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # an abort that fails must not stop the others
        log.debug("abort callback %r failed", callback, exc_info=True)


class TaskType:
    """Base class of task types.

    Subclasses set ``name``, ``summary`` and ``options``, may set ``platforms`` and override ``check``,
    and implement ``run``.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    platforms: ClassVar[frozenset[str]] = ALL_PLATFORMS

    def check(self, config: Mapping[str, Any]) -> list[str]:
        """Return problems with how options combine (each a message); values are already of their kinds.

        Called at load time with the options whose values hold no template, and again before the task runs
        with every option rendered.
        """
        return []

    def run(self, config: dict[str, Any], ctx: TaskContext) -> Outcome:
        """Do the task's work.

        Parameters:
            config: the task's options, rendered and converted to their kinds, defaults filled in.
            ctx: the deadline, the stop flag and abort registration, and the workflow log.

        Returns:
            An Outcome; ``ok=False`` marks the task ``failed``.

        Raises:
            TaskError: the work could not be done; the task's status is ``error``.
            TaskStopped: the work stopped because ``ctx.stop`` was set; ``ctx.check(output=...)`` raises it with
                the output gathered so far, which the task's result keeps.
        """
        raise NotImplementedError


class Registry(dict[str, type[TaskType]]):
    """Task types by name; a missing name raises UnknownTaskType with a "did you mean" suggestion.

    Built-in types are known by name first (``lazy``: name -> ``"module:Class"``) and imported only when a
    workflow uses them; types of other packages come from the ``probe.tasks`` entry-point group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lazy: dict[str, str] = {}
        self.plugins_loaded = False

    def __missing__(self, name: str) -> type[TaskType]:
        target = self.lazy.get(name)
        if target is not None:
            module, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module), attr)
            return self.add(cls) if dict.get(self, name) is None else dict.__getitem__(self, name)
        if not self.plugins_loaded:
            self.load_entry_points()
            if dict.get(self, name) is not None:
                return dict.__getitem__(self, name)
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known types: {', '.join(sorted(names))}"
        raise UnknownTaskType(f"unknown task type '{name}'{hint}")

    def names(self) -> list[str]:
        """Every known task type name, imported or not."""
        return sorted(set(self) | set(self.lazy))

    def add(self, cls: type[TaskType]) -> type[TaskType]:
        """Register ``cls`` under its name; a second type of the same name is an error."""
        if not getattr(cls, "name", None):
            raise DuplicateTaskType(f"task type {cls.__qualname__} has no name")
        existing = dict.get(self, cls.name)
        builtin = self.lazy.get(cls.name)
        if (existing is not None and existing is not cls) or (
            builtin is not None and builtin != f"{cls.__module__}:{cls.__qualname__}"
        ):
            first = existing.__module__ if existing is not None else builtin
            raise DuplicateTaskType(f"task type '{cls.name}' is registered twice: {first} and {cls.__module__}")
        self[cls.name] = cls
        return cls

    def load_entry_points(self) -> None:
        """Register the task types of the ``probe.tasks`` entry-point group, once."""
        self.plugins_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self.lazy:
                continue
            try:
                cls = ep.load()
            except Exception:
                log.warning("task type plugin %s (%s) could not be loaded", ep.name, ep.value, exc_info=True)
                continue
            if isinstance(cls, type) and issubclass(cls, TaskType) and dict.get(self, cls.name) is not cls:
                self.add(cls)


def _builtins() -> Registry:
    from probe.tasks import BUILTINS

    known = Registry()
    known.lazy.update(BUILTINS)
    return known


registry = _builtins()


def register(cls: type[TaskType]) -> type[TaskType]:
    """Class decorator that registers a task type under its ``name``."""
    return registry.add(cls)


def load_plugins() -> None:
    """Import every built-in task type and those of the ``probe.tasks`` entry-point group."""
    for name in list(registry.lazy):
        get_task_type(name)  # importing registers it
    if not registry.plugins_loaded:
        registry.load_entry_points()


def get_task_type(name: str) -> type[TaskType]:
    """Return the task type called ``name``; raises UnknownTaskType with a suggestion when there is none."""
    return registry[name]
