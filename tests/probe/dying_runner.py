"""A stand-in for an agent in the guardian's tests: it runs commands with probe until the test kills it.

``python -m tests.probe.dying_runner DIR STEP...`` runs each step in turn, then writes ``DIR/done`` and sleeps:

- ``run:COMMAND``: run a workflow of one command task, COMMAND being a shell command line;
- ``kill-guardian``: SIGKILL this process's guardian and wait until it has exited;
- ``fork``: fork a child that writes its pid to ``DIR/forked`` and sleeps;
- ``watched``: write the process groups the guardian watches to ``DIR/watched``.

All along, ``DIR/watching`` holds the groups the guardian watches, written again every 20 ms: a test kills the
runner once the command's group is there, not merely once the command runs (the runner registers it just after).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

import probe


def run(command: str) -> None:
    """Run one command task through the public API."""
    task = {"name": "c", "type": "command", "config": {"command": command, "shell": True}}
    text = json.dumps({"name": "runner", "tasks": [task]})  # JSON is YAML
    result = probe.run_workflow(probe.load_workflow(text))
    print(command, result.tasks[0].status.value, flush=True)


def kill_guardian() -> None:
    """SIGKILL the guardian, and wait until it is a zombie (as an agent would not reap it at once)."""
    (found,) = [p for p in psutil.Process().children() if "probe.guardian" in " ".join(p.cmdline())]
    found.send_signal(signal.SIGKILL)
    while found.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)


def fork(directory: Path) -> None:
    """Fork a child that only sleeps, holding whatever it inherited."""
    pid = os.fork()
    if pid == 0:
        (directory / "forked").write_text(f"{os.getpid()}\n")
        time.sleep(300)
        os._exit(0)


def report_watching(directory: Path) -> None:
    """Keep ``DIR/watching`` up to date (replaced whole, so that a reader never sees half of it)."""
    from probe import guardian

    while True:
        (directory / "watching.new").write_text(json.dumps(sorted(guardian.watched())))
        os.replace(directory / "watching.new", directory / "watching")
        time.sleep(0.02)


def main(directory: Path, steps: list[str]) -> None:
    threading.Thread(target=report_watching, args=(directory,), daemon=True).start()
    for step in steps:
        if step.startswith("run:"):
            run(step.removeprefix("run:"))
        elif step == "kill-guardian":
            kill_guardian()
        elif step == "fork":
            fork(directory)
        elif step == "watched":
            from probe import guardian  # here: the other steps run with a probe that has none

            (directory / "watched").write_text(json.dumps(sorted(guardian.watched())))
        else:
            raise SystemExit(f"unknown step {step!r}")
    (directory / "done").write_text("")
    time.sleep(300)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
