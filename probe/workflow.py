"""The workflow model and its strict validation: every problem named with its place and YAML line."""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.durations import DURATION_HELP, format_duration, parse_duration
from probe.errors import Problem, UnknownTaskType, WorkflowError
from probe.tasktype import ALL_PLATFORMS, TaskType, get_task_type
from probe.templates import RESERVED, TemplateError, has_template, references, walk_strings
from probe.yamlload import Node, line_of, load_yaml

WORKFLOW_KEYS = ("name", "description", "timeout", "variables", "tasks")
TASK_KEYS = ("name", "type", "description", "timeout", "config", "retries", "retry_delay", "continue_on_error")
DEFAULT_WORKFLOW_TIMEOUT = 3600.0
MAX_RETRIES = 100
NAME_LIMIT = 200  # characters of a workflow's or a task's name (the control plane stores and indexes them)
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

MISSING_OPTION = "required option '{name}' is missing"
UNKNOWN_KEY = "unknown key '{key}'{hint}"
UNKNOWN_OPTION = "unknown option '{key}'{hint}"
DUPLICATE_TASK = "task name '{name}' is used twice (first at line {first})"
TIMEOUT_TOO_LONG = "timeout {task} is longer than the workflow's timeout {workflow}"
UNPLAIN_VARIABLE = "YAML read this value as {kind}, which is not text, a number, true/false or null: quote it"
UNPLAIN_KINDS = {"date": "a date", "datetime": "a date and time", "bytes": "binary data (!!binary)"}
UNDEFINED_VARIABLE = "variable '{name}' is not defined: give it at run time, under variables, or in the environment"
UNDEFINED_SECRET = "secret '{name}' was not given"  # noqa: S105 - a message, not a password
LATER_TASK = "{text} refers to task '{name}', which does not run before this task"
NAME_TOO_LONG = "{what} names have at most {limit} characters; this one has {length}"


@dataclass(frozen=True)
class TaskSpec:
    """One task as the workflow declares it."""

    index: int
    name: str
    type: str
    config: dict[str, Any]
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 0.0
    continue_on_error: bool = False
    description: str | None = None
    line: int | None = None
    config_lines: Mapping[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The task's place in error messages: ``tasks[2] (deploy)``."""
        return f"tasks[{self.index}] ({self.name})"

    def task_type(self) -> builtins.type[TaskType]:
        """The registered task type of this task."""
        return get_task_type(self.type)


@dataclass(frozen=True)
class Workflow:
    """A validated workflow, ready to run with ``probe.run_workflow``."""

    name: str
    tasks: tuple[TaskSpec, ...]
    timeout: float = DEFAULT_WORKFLOW_TIMEOUT
    variables: Mapping[str, Any] = field(default_factory=dict)
    description: str | None = None
    source: str | None = None
    variable_lines: Mapping[str, int] = field(default_factory=dict)

    @property
    def task_types(self) -> frozenset[str]:
        """The names of the task types the workflow uses."""
        return frozenset(t.type for t in self.tasks)

    @property
    def platforms(self) -> frozenset[str]:
        """The platforms on which every task of the workflow can run."""
        allowed = ALL_PLATFORMS
        for spec in self.tasks:
            allowed = allowed & spec.task_type().platforms
        return allowed

    def missing_values(
        self,
        variables: Mapping[str, Any] | None = None,
        secrets: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> list[Problem]:
        """Return a problem for each variable or secret a placeholder uses that has no value."""
        environment = dict(os.environ) if env is None else env  # as a run reads it (case-sensitive on Windows too)
        given = variables or {}

        def unknown(name: str, *, own: bool = True) -> bool:  # looked up where it may come from: no set built
            return name not in given and name not in environment and not (own and name in self.variables)

        problems = []
        for spec in self.tasks:
            for path, text in walk_strings(spec.config):
                for ref in references(text):
                    if ref.kind == "var" and unknown(ref.name):
                        message = UNDEFINED_VARIABLE.format(name=ref.name)
                    elif ref.kind == "secret" and ref.name not in (secrets or {}):
                        message = UNDEFINED_SECRET.format(name=ref.name)
                    else:
                        continue
                    top = path.split(".")[0].split("[")[0]
                    problems.append(Problem(f"{spec.label}.config.{path}", message, spec.config_lines.get(top)))
        # A workflow variable's value may use run-time variables and the environment, not other variables.
        for name, value in self.variables.items():
            for _, text in walk_strings(value):
                for ref in references(text):
                    if ref.kind == "var" and unknown(ref.name, own=False):
                        message = UNDEFINED_VARIABLE.format(name=ref.name)
                        problems.append(Problem(f"variables.{name}", message, self.variable_lines.get(name)))
                    elif ref.kind == "secret" and ref.name not in (secrets or {}):
                        message = UNDEFINED_SECRET.format(name=ref.name)
                        problems.append(Problem(f"variables.{name}", message, self.variable_lines.get(name)))
        return problems


def _unplain(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """Yield where, and what, each value inside ``value`` is that YAML made but JSON has not (a date, a time,
    binary data): a placeholder cannot render it, and the run would fail with a task's option refused."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _unplain(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _unplain(item, f"{where}[{index}]")
    elif not isinstance(value, str | int | float | bool) and value is not None:
        yield where, UNPLAIN_KINDS.get(type(value).__name__, type(value).__name__)


def load_workflow(source: str | bytes | Path, *, name: str | None = None) -> Workflow:
    """Load and validate a workflow from YAML text or a file path.

    Parameters:
        source: YAML text (str or bytes), or a ``pathlib.Path`` / path string of a ``.yaml``/``.yml`` file.
        name: how to name the source in error messages (default: the file path).

    Raises:
        WorkflowError: every problem found, each with its place and YAML line.
    """
    text: str | bytes
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
    ):
        path = Path(source)
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise WorkflowError(f"cannot read {path}: {exc.strerror}", name or str(path)) from exc
        name = name or str(path)
    else:
        text = source
    document = load_yaml(text, name)
    problems: list[Problem] = []
    workflow = _validate(document, problems)
    if problems or workflow is None:
        raise WorkflowError(problems, name)
    return dataclasses.replace(workflow, source=name)


def _did_you_mean(key: str, choices: Any) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _validate(doc: Any, problems: list[Problem]) -> Workflow | None:
    if not isinstance(doc, Node):
        problems.append(Problem("", "a workflow is a mapping with name and tasks", line_of(doc)))
        return None
    for key in doc:
        if key not in WORKFLOW_KEYS and not key.startswith("x-"):
            hint = _did_you_mean(key, WORKFLOW_KEYS)
            problems.append(Problem("", UNKNOWN_KEY.format(key=key, hint=hint), doc.line_of(key)))
    name = doc.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(Problem("name", "a workflow needs a name (a non-empty string)", doc.line_of("name")))
    elif len(name) > NAME_LIMIT:
        message = NAME_TOO_LONG.format(what="workflow", limit=NAME_LIMIT, length=len(name))
        problems.append(Problem("name", message, doc.line_of("name")))
    description = _optional_str(doc, "description", "description", problems)
    timeout = _duration(doc, "timeout", "timeout", problems, DEFAULT_WORKFLOW_TIMEOUT)
    if timeout is not None and timeout <= 0:
        problems.append(Problem("timeout", "the workflow timeout must be more than zero", doc.line_of("timeout")))
    variables = doc.get("variables", {})
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        problems.append(Problem("variables", "variables must be a mapping of names to values", line_of(variables)))
        variables = {}
    for var in variables:
        if not VARIABLE_NAME.fullmatch(var) or var in RESERVED:
            problems.append(
                Problem(
                    f"variables.{var}",
                    "variable names are letters, digits and _ (not 'secrets' or 'tasks')",
                    line_of(variables, var),
                )
            )
    for var, value in variables.items():
        for where, kind in _unplain(value):
            message = UNPLAIN_VARIABLE.format(kind=kind)
            problems.append(Problem(f"variables.{var}{where}", message, line_of(variables, var)))
    _check_templates("variables", variables, problems, line_of(variables))
    tasks = doc.get("tasks")
    specs: list[TaskSpec] = []
    if not isinstance(tasks, list) or not tasks:
        problems.append(Problem("tasks", "a workflow needs a non-empty list of tasks", doc.line_of("tasks")))
    else:
        seen: dict[str, int | None] = {}
        for index, item in enumerate(tasks):
            spec = _validate_task(index, item, line_of(tasks, index), timeout, seen, problems)
            if spec is not None:
                specs.append(spec)
    if problems:
        return None
    assert isinstance(name, str) and timeout is not None
    return Workflow(
        name=name,
        tasks=tuple(specs),
        timeout=timeout,
        variables=dict(variables),
        description=description,
        variable_lines=dict(getattr(variables, "key_lines", {})),
    )


def _optional_str(node: Node, key: str, path: str, problems: list[Problem]) -> str | None:
    value = node.get(key)
    if value is not None and not isinstance(value, str):
        problems.append(Problem(path, f"{key} must be a string", node.line_of(key)))
        return None
    return value


def _duration(node: Node, key: str, path: str, problems: list[Problem], default: float | None) -> float | None:
    if key not in node or node[key] is None:
        return default
    try:
        return parse_duration(node[key])
    except ValueError:
        problems.append(Problem(path, f"expected {DURATION_HELP}, got {node[key]!r}", node.line_of(key)))
        return None


def _check_templates(path: str, value: Any, problems: list[Problem], line: int | None) -> None:
    for sub, text in walk_strings(value):
        try:
            list(references(text))
        except TemplateError as exc:
            where = f"{path}.{sub}" if sub else path
            top = sub.split(".")[0].split("[")[0]
            problems.append(Problem(where, str(exc), line_of(value, top) if top else line))


def _validate_task(
    index: int,
    item: Any,
    line: int | None,
    workflow_timeout: float | None,
    seen: dict[str, int | None],
    problems: list[Problem],
) -> TaskSpec | None:
    label = f"tasks[{index}]"
    if not isinstance(item, Node):
        problems.append(Problem(label, "a task is a mapping with name, type and config", line))
        return None
    name = item.get("name")
    if isinstance(name, str) and name and len(name) <= NAME_LIMIT:
        label = f"tasks[{index}] ({name})"
    before = len(problems)
    for key in item:
        if key not in TASK_KEYS and not key.startswith("x-"):
            problems.append(
                Problem(label, UNKNOWN_KEY.format(key=key, hint=_did_you_mean(key, TASK_KEYS)), item.line_of(key))
            )
    if not isinstance(name, str) or not name:
        problems.append(Problem(label, "a task needs a name", item.line_of("name")))
    elif not TASK_NAME.fullmatch(name):
        problems.append(Problem(f"{label}.name", "task names are letters, digits, '-' and '_'", item.line_of("name")))
    elif len(name) > NAME_LIMIT:
        message = NAME_TOO_LONG.format(what="task", limit=NAME_LIMIT, length=len(name))
        problems.append(Problem(f"{label}.name", message, item.line_of("name")))
    elif name in seen:
        problems.append(Problem(label, DUPLICATE_TASK.format(name=name, first=seen[name]), item.line_of("name")))
    else:
        seen[name] = item.line_of("name")
    description = _optional_str(item, "description", f"{label}.description", problems)
    timeout = _duration(item, "timeout", f"{label}.timeout", problems, None)
    if timeout is not None and workflow_timeout is not None and timeout > workflow_timeout:
        problems.append(
            Problem(
                f"{label}.timeout",
                TIMEOUT_TOO_LONG.format(task=format_duration(timeout), workflow=format_duration(workflow_timeout)),
                item.line_of("timeout"),
            )
        )
    if timeout is not None and timeout <= 0:
        problems.append(Problem(f"{label}.timeout", "a task timeout must be more than zero", item.line_of("timeout")))
    retries = item.get("retries", 0)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        problems.append(
            Problem(
                f"{label}.retries", f"retries must be a whole number from 0 to {MAX_RETRIES}", item.line_of("retries")
            )
        )
        retries = 0
    retry_delay = _duration(item, "retry_delay", f"{label}.retry_delay", problems, 0.0)
    continue_on_error = item.get("continue_on_error", False)
    if not isinstance(continue_on_error, bool):
        problems.append(
            Problem(
                f"{label}.continue_on_error",
                "continue_on_error must be true or false",
                item.line_of("continue_on_error"),
            )
        )
    type_name = item.get("type")
    config = item.get("config", {})
    if config is None:
        config = {}
    if not isinstance(config, dict):
        problems.append(Problem(f"{label}.config", "config must be a mapping of options", item.line_of("config")))
        config = {}
    if not isinstance(type_name, str) or not type_name:
        problems.append(Problem(label, "a task needs a type", item.line_of("type")))
    else:
        try:
            task_type = get_task_type(type_name)
        except UnknownTaskType as exc:
            problems.append(Problem(f"{label}.type", str(exc), item.line_of("type")))
        else:
            _validate_config(label, task_type, config, item.line_of("config"), problems)
    _check_task_references(label, config, seen, name, problems)
    if len(problems) > before:
        return None
    assert isinstance(name, str) and isinstance(type_name, str) and retry_delay is not None
    return TaskSpec(
        index=index,
        name=name,
        type=type_name,
        config=_plain(config),
        timeout=timeout,
        retries=retries,
        retry_delay=retry_delay,
        continue_on_error=continue_on_error,
        description=description,
        line=line,
        config_lines=dict(getattr(config, "key_lines", {})),
    )


def _validate_config(
    label: str, task_type: type[TaskType], config: dict[str, Any], line: int | None, problems: list[Problem]
) -> None:
    path = f"{label}.config"
    options = task_type.options
    for key in config:
        if key not in options and not key.startswith("x-"):
            problems.append(
                Problem(path, UNKNOWN_OPTION.format(key=key, hint=_did_you_mean(key, options)), line_of(config, key))
            )
    literal: dict[str, Any] = {}
    templated = False
    for key, option in options.items():
        if key not in config or config[key] is None:
            if option.required:
                problems.append(Problem(path, MISSING_OPTION.format(name=key), line))
            elif option.default is not None:
                literal[key] = option.default
            continue
        value = config[key]
        if has_template(value):
            templated = True
            continue
        try:
            literal[key] = option.coerce(value)
        except ValueError as exc:
            problems.append(Problem(f"{path}.{key}", str(exc), line_of(config, key)))
    if not templated and not any(p.path.startswith(path) for p in problems):
        for message in task_type().check(literal):
            problems.append(Problem(path, message, line))
    _check_templates(path, config, problems, line)


def _check_task_references(
    label: str, config: dict[str, Any], seen: dict[str, int | None], own: Any, problems: list[Problem]
) -> None:
    earlier = set(seen) - {own}
    for sub, text in walk_strings(config):
        try:
            refs = list(references(text))
        except TemplateError:
            continue  # reported by _check_templates
        for ref in refs:
            if ref.kind == "task" and ref.name not in earlier:
                top = sub.split(".")[0].split("[")[0]
                problems.append(
                    Problem(
                        f"{label}.config.{sub}", LATER_TASK.format(text=ref.text, name=ref.name), line_of(config, top)
                    )
                )


def _plain(value: Any) -> Any:
    """Return a copy of a loaded value made of plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
