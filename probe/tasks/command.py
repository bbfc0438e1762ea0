"""The ``command`` task type: run a local program, without a shell unless the workflow asks for one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from probe.process import run_process
from probe.tasktype import Option, Outcome, TaskContext, TaskType, register

NO_SHELL_STRING = "command is one program name when shell is false; put its arguments in args, or set shell: true"
SHELL_WITH_ARGS = "args cannot be used with shell: true; write the whole command line in command"


def exit_outcome(code: int, output: str, stderr: str, expected: list[int], dropped: int) -> Outcome:
    """Return the outcome of a finished process: success when its exit code is expected."""
    metrics: dict[str, Any] = {"exit_code": code}
    if code in expected:
        return Outcome(True, output, None, metrics, dropped)
    tail = stderr.strip()[-2000:]
    error = f"exit code {code} (expected {', '.join(map(str, expected))})"
    return Outcome(False, output, f"{error}: {tail}" if tail else error, metrics, dropped)


@register
class CommandTask(TaskType):
    """Run a program with arguments (no shell), or one command line through the shell with ``shell: true``."""

    name = "command"
    summary = "run a local program and check its exit code"
    options = {
        "command": Option(
            "string|list",
            required=True,
            items="string",
            help="the program (or, with shell: true, the whole command line); a list is argv",
        ),
        "args": Option("list", items="string", help="arguments, passed as they are (no shell parsing)"),
        "shell": Option("boolean", default=False, help="run command through /bin/sh (cmd.exe on Windows)"),
        "env": Option("mapping", help="environment variables added for the program"),
        "cwd": Option("string", help="working directory"),
        "expected_exit_codes": Option("list", items="integer", default=[0], help="exit codes that succeed"),
    }

    def check(self, config: Mapping[str, Any]) -> list[str]:
        """Refuse arguments with a shell command line, and an empty command."""
        problems = []
        command = config.get("command")
        if config.get("shell") and config.get("args"):
            problems.append(SHELL_WITH_ARGS)
        if config.get("shell") and isinstance(command, list):
            problems.append("with shell: true, command is one string")
        if command in ("", []):
            problems.append("command is empty")
        return problems

    def run(self, config: dict[str, Any], ctx: TaskContext) -> Outcome:
        """Run the program and report its exit code; stdout and stderr are the output."""
        command = config["command"]
        argv: list[str] | str
        if config["shell"]:
            argv = command
        else:
            argv = [*command] if isinstance(command, list) else [command]
            argv += config.get("args") or []
        result = run_process(argv, ctx=ctx, shell=config["shell"], env=config.get("env"), cwd=config.get("cwd"))
        outcome = exit_outcome(
            result.exit_code, result.output, result.stderr, config["expected_exit_codes"], result.dropped
        )
        if result.leftovers == "killed":
            ctx.log("background processes still holding the output were stopped when the command ended", "warning")
        elif result.leftovers == "detached":
            ctx.log("a detached background process still holds the output; stopped reading it", "warning")
        return outcome
