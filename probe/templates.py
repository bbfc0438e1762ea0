"""Go-template style placeholders in workflow values: ``{{.NAME}}``, ``{{.secrets.NAME}}``,
``{{.tasks.NAME.output}}``, ``{{.tasks.NAME.metrics.KEY}}``; ``{{"{{"}}`` writes a literal.

A string that is one placeholder and nothing else keeps the type of its value (a number stays a number);
placeholders inside longer text are rendered as text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from probe.errors import ProbeError

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_SINGLE = re.compile(r"\{\{((?:(?!\}\}).)*)\}\}", re.DOTALL)
_REFERENCE = re.compile(r"\.([A-Za-z_][\w-]*(?:\.[\w-]+)*)")
_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"')

RESERVED = frozenset({"secrets", "tasks"})
TASK_FIELDS = ("output", "error", "status", "metrics")


class TemplateError(ProbeError):
    """Raised when a placeholder is malformed or names something that has no value."""


@dataclass(frozen=True)
class Reference:
    """One placeholder's target: ``kind`` is ``var``, ``secret`` or ``task``; ``field``/``key`` for tasks."""

    kind: str
    name: str
    field: str | None = None
    key: str | None = None
    text: str = ""


def _parse(expr: str) -> Reference | str:
    """Parse the inside of ``{{ }}``: a Reference, or the text of a string literal."""
    body = expr.strip()
    literal = _LITERAL.fullmatch(body)
    if literal:
        return str(json.loads(f'"{literal.group(1)}"'))
    match = _REFERENCE.fullmatch(body)
    if not match:
        raise TemplateError(f"'{{{{{expr}}}}}' is not a placeholder this engine understands; use {{{{.NAME}}}}")
    parts = match.group(1).split(".")
    text = "{{." + match.group(1) + "}}"
    head = parts[0]
    if head == "secrets":
        if len(parts) != 2:
            raise TemplateError(f"{text}: write secrets as {{{{.secrets.NAME}}}}")
        return Reference("secret", parts[1], text=text)
    if head == "tasks":
        if len(parts) < 3 or parts[2] not in TASK_FIELDS:
            raise TemplateError(
                f"{text}: write task results as {{{{.tasks.NAME.output}}}}, .error, .status or .metrics.KEY"
            )
        if parts[2] == "metrics":
            if len(parts) != 4:
                raise TemplateError(f"{text}: name one metric, as in {{{{.tasks.NAME.metrics.KEY}}}}")
            return Reference("task", parts[1], "metrics", parts[3], text=text)
        if len(parts) != 3:
            raise TemplateError(f"{text}: a task's {parts[2]} has no fields")
        return Reference("task", parts[1], parts[2], text=text)
    if len(parts) != 1:
        raise TemplateError(f"{text}: variables are single names; write {{{{.{head}}}}}")
    return Reference("var", head, text=text)


def references(text: str) -> Iterator[Reference]:
    """Yield every reference in a string; raises TemplateError for a malformed placeholder."""
    for match in _PLACEHOLDER.finditer(text):
        parsed = _parse(match.group(1))
        if isinstance(parsed, Reference):
            yield parsed
    rest = _PLACEHOLDER.sub("", text)
    if "{{" in rest:
        raise TemplateError('an opening "{{" has no closing "}}"; write {{"{{"}} for a literal')


def secret_names(text: str) -> set[str]:
    """The names of the secrets the placeholders in ``text`` use; a malformed placeholder names none."""
    names = set()
    for match in _PLACEHOLDER.finditer(text):
        try:
            parsed = _parse(match.group(1))
        except TemplateError:
            continue
        if isinstance(parsed, Reference) and parsed.kind == "secret":
            names.add(parsed.name)
    return names


def walk_strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Yield (path, string) for every string inside a value of nested mappings and lists."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from walk_strings(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk_strings(item, f"{path}[{index}]")


def has_template(value: Any) -> bool:
    """True when a value holds a placeholder anywhere inside it."""
    return any("{{" in text for _, text in walk_strings(value))


class Scope:
    """The values placeholders resolve to: variables, secrets and the results of earlier tasks."""

    def __init__(
        self,
        variables: Mapping[str, Any],
        secrets: Mapping[str, str] | None = None,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.variables = variables
        self.secrets = secrets or {}
        self.tasks: Mapping[str, Mapping[str, Any]] = tasks if tasks is not None else {}

    def lookup(self, ref: Reference) -> Any:
        """Return the value a reference names; raises TemplateError when it has none."""
        if ref.kind == "var":
            if ref.name not in self.variables:
                raise TemplateError(f"variable '{ref.name}' is not defined")
            return self.variables[ref.name]
        if ref.kind == "secret":
            if ref.name not in self.secrets:
                raise TemplateError(f"secret '{ref.name}' was not given")
            return self.secrets[ref.name]
        result = self.tasks.get(ref.name)
        if result is None:
            raise TemplateError(f"task '{ref.name}' has not run before this task")
        if ref.field == "metrics":
            metrics = result.get("metrics") or {}
            if ref.key not in metrics:
                known = ", ".join(sorted(metrics)) or "none"
                raise TemplateError(f"task '{ref.name}' has no metric '{ref.key}' (it has: {known})")
            return metrics[ref.key]
        return result.get(ref.field or "output")

    def render(self, value: Any) -> Any:
        """Return ``value`` with every placeholder replaced; mappings and lists are rendered inside."""
        if isinstance(value, str):
            return self._render_text(value)
        if isinstance(value, Mapping):
            return {key: self.render(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.render(item) for item in value]
        return value

    def _render_text(self, text: str) -> Any:
        if "{{" not in text:
            return text
        whole = _SINGLE.fullmatch(text)
        if whole:
            parsed = _parse(whole.group(1))
            return self.lookup(parsed) if isinstance(parsed, Reference) else parsed
        list(references(text))  # raises on malformed placeholders

        def substitute(match: re.Match[str]) -> str:
            parsed = _parse(match.group(1))
            if not isinstance(parsed, Reference):
                return parsed
            return _as_text(self.lookup(parsed))

        return _PLACEHOLDER.sub(substitute, text)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)
