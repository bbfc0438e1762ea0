"""The ``probe`` command: run, validate and list task types.

Exit codes: 0 the workflow succeeded (or every file is valid), 1 it did not succeed, 2 the workflow is
invalid or the command line is wrong, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any, TextIO

from probe.durations import format_duration, parse_duration
from probe.errors import ProbeError, WorkflowError
from probe.results import Status
from probe.runner import run_workflow
from probe.tasktype import load_plugins, registry
from probe.workflow import load_workflow

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130

_SYMBOLS = {
    Status.SUCCEEDED: ("✓", "32"),
    Status.FAILED: ("✗", "31"),
    Status.ERROR: ("✗", "31"),
    Status.TIMED_OUT: ("⏱", "33"),
    Status.SKIPPED: ("-", "90"),
    Status.CANCELLED: ("⊘", "33"),
}


class UsageError(ProbeError):
    """Raised when a command-line value is malformed."""


def _pairs(items: Sequence[str], what: str, from_env: bool) -> dict[str, str]:
    """Parse ``K=V`` items; with ``from_env`` a bare ``K`` takes the value of environment variable K."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            if not from_env or key not in os.environ:
                hint = " (or K to read environment variable K)" if from_env else ""
                raise UsageError(f"--{what} takes K=V{hint}, got {item!r}")
            value = os.environ[key]
        if not key:
            raise UsageError(f"--{what} needs a name before '=', got {item!r}")
        values[key] = value
    return values


class Printer:
    """Prints a line as each task starts and finishes, and a summary."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.color = stream.isatty() and "NO_COLOR" not in os.environ
        encoding = (getattr(stream, "encoding", None) or "").lower()
        self.fancy = encoding.startswith("utf")

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def symbol(self, status: Status) -> str:
        mark, code = _SYMBOLS[status]
        return self.paint(mark if self.fancy else status.value.upper()[:4], code)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "task_started":
            again = f" (attempt {event['attempt']})" if event.get("attempt", 1) > 1 else ""
            arrow = "▶" if self.fancy else ">"
            self.write(f"{self.paint(arrow, '36')} {event['task']} ({event['type']}){again}")
        elif kind == "task_retrying":
            self.write(f"  {event['task']} {event['status']}: {event.get('error') or ''}; retrying")
        elif kind == "task_log":
            self.write(f"  {event['task']}: [{event['level']}] {event['message']}")
        elif kind == "task_finished":
            result = event["result"]
            status = Status(result["status"])
            took = format_duration(result["metrics"].get("duration_ms", 0) / 1000)
            tries = f", {result['attempts']} attempts" if result["attempts"] > 1 else ""
            line = f"{self.symbol(status)} {result['name']} {status.value} in {took}{tries}"
            if result.get("error"):
                line += f": {result['error']}"
            self.write(line)

    def summary(self, result: Any) -> None:
        counts: dict[str, int] = {}
        for task in result.tasks:
            counts[task.status.value] = counts.get(task.status.value, 0) + 1
        for task in result.tasks:
            if task.status in (Status.SKIPPED, Status.CANCELLED):
                self.write(f"{self.symbol(task.status)} {task.name} {task.status.value}")
        parts = ", ".join(f"{n} {s}" for s, n in counts.items())
        took = format_duration(result.duration_ms / 1000)
        self.write(f"{self.symbol(result.status)} workflow {result.name} {result.status.value} in {took} ({parts})")

    def write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    """Run one workflow file."""
    variables = _pairs(args.var, "var", from_env=False)
    secrets = _pairs(args.secret, "secret", from_env=True)
    timeout = parse_duration(args.timeout) if args.timeout else None
    workflow = load_workflow(args.file)
    cancel = threading.Event()
    printer = Printer(sys.stderr if args.json else sys.stdout)
    interrupted = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        result = run_workflow(
            workflow,
            variables=variables,
            secrets=secrets,
            cancel=cancel,
            on_event=None if args.quiet else printer,
            timeout=timeout,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.quiet:
        printer.summary(result)
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if result.success else EXIT_FAILED


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate workflow files; with --var/--secret also check every placeholder has a value."""
    variables = _pairs(args.var, "var", from_env=False)
    secrets = _pairs(args.secret, "secret", from_env=True)
    status = EXIT_OK
    for path in args.files:
        try:
            workflow = load_workflow(path)
            if args.strict:
                problems = workflow.missing_values(variables, secrets)
                if problems:
                    raise WorkflowError(problems, path)
        except WorkflowError as exc:
            print(exc.describe(), file=sys.stderr)
            status = EXIT_INVALID
            continue
        count = len(workflow.tasks)
        print(f"{path}: valid ({count} task{'' if count == 1 else 's'})")
    return status


def cmd_tasks(args: argparse.Namespace) -> int:
    """List the task types and their options."""
    load_plugins()
    if args.json:
        data = {
            name: {
                "summary": cls.summary,
                "platforms": sorted(cls.platforms),
                "options": {
                    k: {"kind": o.kind, "required": o.required, "default": o.default, "help": o.help}
                    for k, o in cls.options.items()
                },
            }
            for name, cls in sorted(registry.items())
        }
        print(json.dumps(data, indent=2))
        return EXIT_OK
    for name, cls in sorted(registry.items()):
        platforms = "" if len(cls.platforms) == 3 else f" [{', '.join(sorted(cls.platforms))} only]"
        print(f"{name}: {cls.summary}{platforms}")
        for key, option in cls.options.items():
            need = (
                "required"
                if option.required
                else f"default {json.dumps(option.default)}"
                if option.default is not None
                else "optional"
            )
            print(f"    {key:<26} {option.kind:<16} {need:<16} {option.help}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``probe`` command."""
    parser = argparse.ArgumentParser(prog="probe", description="Run and validate YAML workflows.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow")
    run.add_argument("file")
    run.add_argument("--var", action="append", default=[], metavar="K=V", help="a variable (repeatable)")
    run.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="K=V",
        help="a secret; K alone reads environment variable K (repeatable)",
    )
    run.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    run.add_argument("--timeout", metavar="D", help="a limit for the whole run, e.g. 30s or 5m")
    run.add_argument("-q", "--quiet", action="store_true", help="print nothing but the JSON result, if asked")
    run.set_defaults(func=cmd_run)
    validate = sub.add_parser("validate", help="validate workflow files")
    validate.add_argument("files", nargs="+")
    validate.add_argument("--var", action="append", default=[], metavar="K=V")
    validate.add_argument("--secret", action="append", default=[], metavar="K=V")
    validate.add_argument(
        "--strict", action="store_true", help="also require a value for every variable and secret a placeholder uses"
    )
    validate.set_defaults(func=cmd_validate)
    tasks = sub.add_parser("tasks", help="list the task types and their options")
    tasks.add_argument("--json", action="store_true")
    tasks.set_defaults(func=cmd_tasks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``probe`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except WorkflowError as exc:
        print(exc.describe(), file=sys.stderr)
        return EXIT_INVALID
    except (UsageError, ValueError) as exc:
        print(f"probe: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
