"""The ``powershell`` task type: a script run by Windows PowerShell or PowerShell 7 (pwsh)."""

from __future__ import annotations

import base64
import shutil
import sys
from typing import Any

from probe.errors import TaskError
from probe.process import run_process
from probe.tasks.command import exit_outcome
from probe.tasktype import Option, Outcome, TaskContext, TaskType, register

NO_POWERSHELL = "no PowerShell on this host: neither powershell.exe nor pwsh was found on PATH"


def find_powershell() -> str | None:
    """Return the PowerShell executable of this host: powershell.exe on Windows, else pwsh; None if neither."""
    candidates = ["powershell.exe", "pwsh.exe", "pwsh"] if sys.platform == "win32" else ["pwsh"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def encode_script(script: str) -> str:
    """Return the script in the form ``-EncodedCommand`` takes: base64 of UTF-16LE."""
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")


@register
class PowerShellTask(TaskType):
    """Run a PowerShell script, passed with -EncodedCommand so no quoting can change it."""

    name = "powershell"
    summary = "run a PowerShell script (Windows PowerShell, or pwsh where installed)"
    platforms = frozenset({"windows"})
    options = {
        "script": Option("string", required=True, help="the PowerShell script"),
        "env": Option("mapping", help="environment variables added for the script"),
        "cwd": Option("string", help="working directory"),
        "expected_exit_codes": Option("list", items="integer", default=[0], help="exit codes that succeed"),
    }

    def run(self, config: dict[str, Any], ctx: TaskContext) -> Outcome:
        """Run the script with -NoProfile -NonInteractive and check its exit code."""
        executable = find_powershell()
        if executable is None:
            raise TaskError(NO_POWERSHELL)
        argv = [executable, "-NoProfile", "-NonInteractive", "-EncodedCommand", encode_script(config["script"])]
        result = run_process(argv, ctx=ctx, env=config.get("env"), cwd=config.get("cwd"))
        return exit_outcome(
            result.exit_code, result.output, result.stderr, config["expected_exit_codes"], result.dropped
        )
