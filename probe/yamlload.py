"""Safe YAML loading that remembers the line of every key and item, with limits against hostile documents.

Mappings load as ``Node`` dicts and sequences as ``NodeList`` lists; both know the line they start on and
the line of each key or item, so validation can name the line of any problem.
"""

from __future__ import annotations

from typing import Any

import yaml

from probe.errors import Problem, WorkflowError

MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_NODES = 100_000  # values built after alias expansion; a "billion laughs" document passes this fast

TOO_LARGE = "the document is {size} bytes; workflows are limited to 1 MiB"
MULTIPLE_DOCUMENTS = "the file holds more than one YAML document; a workflow is a single document"
EMPTY_DOCUMENT = "the document is empty"
ALIAS_BOMB = "the document expands to more than {limit} values through YAML aliases; refusing to load it"
DUPLICATE_KEY = "duplicate key '{key}' (first at line {first})"
BAD_SCALAR = "invalid YAML: {value} cannot be read as {kind}{reason}"
SHOWN_CHARACTERS = 40


# libyaml's parser when PyYAML was built with it: the same safe constructor, about 10x faster.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")


class Node(dict[str, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int | None = None
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int | None:
        """Return the line of ``key``, or of the mapping itself when the key is absent."""
        return self.key_lines.get(key, self.line)


class NodeList(list[Any]):
    """A YAML sequence that remembers its own line and the line of each item."""

    line: int | None = None
    item_lines: list[int]

    def line_of(self, index: int) -> int | None:
        """Return the line of item ``index``."""
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


def line_of(value: Any, key: str | int | None = None) -> int | None:
    """Return the line of ``value`` (or of its key or item ``key``) when it came from YAML."""
    if key is not None and isinstance(value, (Node, NodeList)):
        return value.line_of(key)  # type: ignore[arg-type]
    return getattr(value, "line", None)


class _Builder:
    """Turns a composed YAML node graph into Node/NodeList/scalars, counting values to stop alias bombs."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.count = 0
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise WorkflowError(ALIAS_BOMB.format(limit=MAX_NODES))
        line = node.start_mark.line + 1
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _PLAIN_TAGS:
            raise WorkflowError(Problem("", f"invalid YAML: the tag {node.tag} is not allowed", line))
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # resolves "<<" merge keys
            mapping = Node()
            mapping.line, mapping.key_lines = line, {}
            for key_node, value_node in node.value:
                key = self.build(key_node)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    self.problems.append(Problem("", "mapping keys must be plain values", line))
                    continue
                key = str(key) if not isinstance(key, str) else key
                key_line = key_node.start_mark.line + 1
                if key in mapping.key_lines:
                    self.problems.append(
                        Problem("", DUPLICATE_KEY.format(key=key, first=mapping.key_lines[key]), key_line)
                    )
                mapping.key_lines[key] = key_line
                mapping[key] = self.build(value_node)
            return mapping
        if isinstance(node, yaml.SequenceNode):
            items = NodeList()
            items.line, items.item_lines = line, []
            for item in node.value:
                items.item_lines.append(item.start_mark.line + 1)
                items.append(self.build(item))
            return items
        try:
            return self.loader.construct_object(node, deep=True)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            # a scalar its tag cannot make (!!int abc, a 13th month, an integer of 5000 digits): PyYAML's
            # constructors raise plain exceptions, without the line a YAML error carries
            kind = node.tag.rpartition(":")[2] or node.tag
            told = isinstance(exc, ValueError | OverflowError) and str(exc)  # the others' texts say nothing useful
            reason = f" ({exc})" if told else ""
            problem = BAD_SCALAR.format(value=_shown(node.value), kind=kind, reason=reason)
            raise WorkflowError(Problem("", problem, line)) from None


def _shown(value: object) -> str:
    """A scalar as a problem quotes it: its start when it is long."""
    text = str(value)
    return repr(text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "…")


def load_yaml(text: str | bytes, source: str | None = None) -> Any:
    """Parse one YAML document safely, keeping line numbers.

    Raises:
        WorkflowError: the document is too large, not YAML, several documents, empty, or an alias bomb.
    """
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > MAX_DOCUMENT_BYTES:
        raise WorkflowError(TOO_LARGE.format(size=size), source)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WorkflowError(f"the document is not UTF-8 text ({exc.reason} at byte {exc.start})", source) from exc
    try:
        loader = _Loader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters such as NUL
        raise WorkflowError(Problem("", _yaml_message(exc), _mark_line(exc, text)), source) from exc
    try:
        root = loader.get_single_node()
    except yaml.composer.ComposerError as exc:
        if "expected a single document" in str(exc):
            raise WorkflowError(Problem("", MULTIPLE_DOCUMENTS, _mark_line(exc, text)), source) from exc
        raise WorkflowError(Problem("", _yaml_message(exc), _mark_line(exc, text)), source) from exc
    except yaml.YAMLError as exc:
        raise WorkflowError(Problem("", _yaml_message(exc), _mark_line(exc, text)), source) from exc
    finally:
        loader.dispose()
    if root is None:
        raise WorkflowError(EMPTY_DOCUMENT, source)
    builder = _Builder(loader)
    try:
        value = builder.build(root)
    except WorkflowError as exc:
        exc.source = source
        raise WorkflowError(exc.problems, source) from None
    except yaml.YAMLError as exc:
        raise WorkflowError(Problem("", _yaml_message(exc), _mark_line(exc, text)), source) from exc
    except RecursionError:
        raise WorkflowError(ALIAS_BOMB.format(limit=MAX_NODES), source) from None
    if builder.problems:
        raise WorkflowError(builder.problems, source)
    return value


def _mark_line(exc: yaml.YAMLError, text: str) -> int | None:
    """The line a YAML error points at (a reader error knows only its character position)."""
    position = getattr(exc, "position", None)
    if isinstance(position, int):
        return text.count("\n", 0, position) + 1
    problem = getattr(exc, "problem_mark", None)
    context = getattr(exc, "context_mark", None)
    lines = text.splitlines()
    if problem is not None and problem.line + 1 > len(lines):
        # Past the end of the text (an unclosed bracket or quote): where the unclosed part starts says more.
        opened = _unclosed_line(lines)
        if opened is not None:
            return opened
        if context is not None and context.line < len(lines):
            return context.line + 1
        return _last_content_line(lines)
    mark = problem or context
    return mark.line + 1 if mark is not None else None


def _unclosed_line(lines: list[str]) -> int | None:
    """The line of the last ``[`` or ``{`` never closed, outside quotes and comments (None: all closed)."""
    opened: list[int] = []
    quote = ""
    for number, line in enumerate(lines, start=1):
        previous = " "
        for index, char in enumerate(line):
            if quote:
                if char == quote and not (quote == '"' and line[index - 1 : index] == "\\"):
                    quote = ""
            elif char in "'\"" and (previous in " \t[{,:" or index == 0):
                quote = char
            elif char == "#" and previous in " \t":
                break
            elif char in "[{":
                opened.append(number)
            elif char in "]}" and opened:
                opened.pop()
            previous = char
    return opened[-1] if opened else None


def _last_content_line(lines: list[str]) -> int:
    """The last line with something other than blanks or a comment (1 for a text without one)."""
    for number in range(len(lines), 0, -1):
        stripped = lines[number - 1].strip()
        if stripped and not stripped.startswith("#"):
            return number
    return 1


def _yaml_message(exc: yaml.YAMLError) -> str:
    """A one-line description of a YAML syntax error, without PyYAML's multi-line excerpt."""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    if problem:
        text = f"{context} {problem}" if context else problem
        return f"invalid YAML: {text}"
    return f"invalid YAML: {str(exc).splitlines()[0]}"
