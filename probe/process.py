"""Run a local process for a task: output read concurrently and bounded, the whole process tree stopped on abort.

On POSIX the child leads a new session, so a timeout or a cancel kills its whole process group; on Windows
it gets a new process group and ``taskkill /T /F`` ends its tree.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from probe.errors import TaskError
from probe.tasktype import TaskContext

WINDOWS = sys.platform == "win32"
# How long output pipes may stay open after the process itself exited (a background child holding them).
PIPE_GRACE = 0.5


@dataclass
class ProcessResult:
    """A finished process: its exit code and its output, each stream kept up to the limit."""

    exit_code: int
    stdout: str
    stderr: str
    dropped: int = 0
    leftovers_killed: bool = False

    @property
    def output(self) -> str:
        """stdout followed by stderr, as a task's output shows them."""
        if self.stdout and self.stderr:
            sep = "" if self.stdout.endswith("\n") else "\n"
            return f"{self.stdout}{sep}{self.stderr}"
        return self.stdout or self.stderr


class Sink:
    """Keeps the first ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.limit - self.kept
        if room > 0:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))
        self.dropped += max(0, len(data) - max(room, 0))

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` and every process of its group (POSIX) or tree (Windows)."""
    if WINDOWS:
        subprocess.run(
            ["taskkill", "/T", "/F", "/PID", str(proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_process(
    argv: Sequence[str] | str,
    *,
    ctx: TaskContext,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    limit: int | None = None,
) -> ProcessResult:
    """Run a process to its end, or until the task is stopped.

    Parameters:
        argv: the program and its arguments (no shell), or one command line when ``shell`` is true.
        ctx: the running task's context; its abort kills the process tree.
        shell: run ``argv`` through the system shell.
        env: variables added to the inherited environment.
        cwd: the working directory.
        limit: bytes kept of each of stdout and stderr (default: the task's output limit).

    Returns:
        The exit code and output.

    Raises:
        TaskError: the program cannot be started.
        TaskStopped: the task was stopped (the process tree has been killed).
    """
    limit = ctx.output_limit if limit is None else limit
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update({str(k): str(v) for k, v in env.items()})
    kwargs: dict[str, object] = {}
    if WINDOWS:
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
    try:
        proc = subprocess.Popen(
            argv,
            shell=shell,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            **kwargs,  # type: ignore[call-overload]
        )
    except (OSError, ValueError) as exc:
        shown = argv if isinstance(argv, str) else argv[0] if argv else "''"
        raise TaskError(f"cannot start {shown}: {exc.strerror if isinstance(exc, OSError) else exc}") from exc

    unregister = ctx.on_abort(lambda: kill_tree(proc))
    out, err = Sink(limit), Sink(limit)
    try:
        leftovers = (_pump_threads if WINDOWS else _pump_select)(proc, out, err)
        code = proc.wait()
    finally:
        unregister()
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    ctx.check()
    return ProcessResult(code, out.text(), err.text(), out.dropped + err.dropped, leftovers)


def _pump_select(proc: subprocess.Popen[bytes], out: Sink, err: Sink) -> bool:
    """Read both pipes until EOF; returns True when leftover background processes had to be killed."""
    assert proc.stdout is not None and proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    exited_at: float | None = None
    killed = False
    try:
        while sel.get_map():
            for key, _ in sel.select(timeout=0.1):
                data = os.read(key.fd, 65536)
                if data:
                    key.data.feed(data)
                else:
                    sel.unregister(key.fileobj)
            if exited_at is None:
                if proc.poll() is not None:
                    exited_at = time.monotonic()
            elif time.monotonic() - exited_at > PIPE_GRACE and not killed:
                # The process is gone but something it started still holds our pipes: end that too.
                kill_tree(proc)
                killed = True
    finally:
        sel.close()
    return killed


def _pump_threads(proc: subprocess.Popen[bytes], out: Sink, err: Sink) -> bool:
    """Read both pipes on threads (Windows pipes cannot be selected)."""

    def drain(stream: object, sink: Sink) -> None:
        while True:
            data = stream.read1(65536)  # type: ignore[attr-defined]
            if not data:
                return
            sink.feed(data)

    threads = [
        threading.Thread(target=drain, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, err), daemon=True),
    ]
    for t in threads:
        t.start()
    proc.wait()
    killed = False
    for t in threads:
        t.join(PIPE_GRACE)
        if t.is_alive() and not killed:
            kill_tree(proc)
            killed = True
    for t in threads:
        t.join()
    return killed
