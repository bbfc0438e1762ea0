"""Run a local process for a task: output read concurrently and bounded, the whole process tree stopped on abort.

On POSIX the child leads a new session, so a timeout or a cancel kills its whole process group, and so does the
guardian (``probe.guardian``) should this process die; on Windows it gets a new process group and
``taskkill /T /F`` ends its tree.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from probe import guardian
from probe.errors import TaskError
from probe.tasktype import TaskContext

WINDOWS = sys.platform == "win32"
# Windows runs a batch file through cmd.exe, which reads these in its arguments as a shell would
CMD_SPECIAL = frozenset('"&|<>^%!()\r\n')
BATCH_ARGUMENT = (
    "{program} is a batch file, which Windows runs through cmd.exe, and cmd.exe would read {char!r} in argument "
    "{index} as a shell does: set shell: true to run it through the shell on purpose, or pass plain arguments"
)


def batch_argument_problem(argv: Sequence[str], *, windows: bool = WINDOWS) -> str | None:
    """Why ``argv`` may not run without a shell, or None: on Windows, a ``.bat`` or ``.cmd`` program with an argument
    that cmd.exe would interpret (its metacharacters), which would make "no shell" untrue."""
    # Windows drops a file name's trailing dots and spaces: "deploy.bat. " runs deploy.bat
    if not windows or not argv or not argv[0].rstrip(" .").lower().endswith((".bat", ".cmd")):
        return None
    for index, argument in enumerate(argv[1:], start=1):
        special = next((char for char in argument if char in CMD_SPECIAL), None)
        if special is not None:
            return BATCH_ARGUMENT.format(program=os.path.basename(argv[0]), char=special, index=index)
    return None


# How long output pipes may stay open after the process itself exited (a background child holding them).
PIPE_GRACE = 0.5


@dataclass
class ProcessResult:
    """A finished process: its exit code and its output, each stream kept up to the limit."""

    exit_code: int
    stdout: str
    stderr: str
    dropped: int = 0
    leftovers: str | None = None  # "killed" or "detached": see _pump_poll

    @property
    def output(self) -> str:
        """stdout followed by stderr, as a task's output shows them."""
        if self.stdout and self.stderr:
            sep = "" if self.stdout.endswith("\n") else "\n"
            return f"{self.stdout}{sep}{self.stderr}"
        return self.stdout or self.stderr


class Sink:
    """Keeps the first ``limit`` bytes of a stream and counts the rest; when given ``on_lines`` (a task context's
    ``output`` for this stream), hands it each complete line of what it keeps as it comes, and the rest at ``close``.
    """

    def __init__(self, limit: int, on_lines: Callable[..., None] | None = None) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0
        self.on_lines = on_lines
        self.line: list[bytes] = []  # what was kept after the last line break, while lines are handed over
        self.after_cr = False  # the last piece handed over ended in "\r": a "\n" first in the next ends no line

    def feed(self, data: bytes) -> None:
        room = self.limit - self.kept
        kept = b""
        if room > 0:
            kept = data[:room]
            if len(data) >= room:  # full now: end on a whole character, the rest of it counted as dropped
                kept = _whole_characters(kept)
                self.limit = self.kept + len(kept)
            self.chunks.append(kept)
            self.kept += len(kept)
            on_lines = self.on_lines  # read once: close() may take it from another thread (Windows' pumps)
            if on_lines is not None:
                self._hand(kept, on_lines)
        self.dropped += len(data) - len(kept)

    def _hand(self, kept: bytes, on_lines: Callable[..., None]) -> None:
        if self.after_cr and kept.startswith(b"\n"):
            kept = kept[1:]  # the "\n" of a "\r\n" that two reads cut apart
        self.after_cr = False
        end = max(kept.rfind(b"\n"), kept.rfind(b"\r"))  # "\r" too: a progress bar's line ends there
        if end == -1:
            self.line.append(kept)
            return
        complete = b"".join([*self.line, kept[:end]])
        self.line = [kept[end + 1 :]]
        self.after_cr = end == len(kept) - 1 and kept.endswith(b"\r")
        # decoded as text() does: a line break is never part of a UTF-8 sequence, so lines decode alike alone
        on_lines(LINE_BREAK.split(complete.decode("utf-8", "replace")))

    def close(self) -> None:
        """The stream ended (or is no longer read): hand over its last line, if it had no line break, and the count
        of bytes not kept."""
        on_lines, self.on_lines = self.on_lines, None
        if on_lines is not None and (self.kept or self.dropped):  # a stream that said nothing has nothing to end
            rest = b"".join(self.line)
            on_lines([rest.decode("utf-8", "replace")] if rest else [], last=True, dropped=self.dropped)

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _whole_characters(data: bytes) -> bytes:
    """``data`` without a UTF-8 character cut short at its end. Decoded, such a remnant would end the kept output in
    U+FFFD, and a secret's beginning just before it would not be seen as the end of the cut output, and not masked."""
    start = len(data) - 1
    while start >= 0 and len(data) - start <= 4 and data[start] & 0xC0 == 0x80:
        start -= 1  # back over continuation bytes to the character's first byte
    if start < 0 or data[start] < 0xC0:
        return data  # ASCII, or no lead byte where one would be
    needs = 2 if data[start] < 0xE0 else 3 if data[start] < 0xF0 else 4
    return data[:start] if len(data) - start < needs else data


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
        ctx: the running task's context; its abort kills the process tree, and each line of output read is handed
            to its ``output`` as it comes, when someone listens.
        shell: run ``argv`` through the system shell.
        env: variables added to the inherited environment.
        cwd: the working directory.
        limit: bytes kept of each of stdout and stderr (default: the task's output limit).

    Returns:
        The exit code and output.

    Raises:
        TaskError: the program cannot be started, or (on Windows) is a batch file given arguments cmd.exe would
            interpret without ``shell``.
        TaskStopped: the task was stopped (the process tree has been killed); it carries the output read until then.
    """
    limit = ctx.output_limit if limit is None else limit
    problem = None if shell or isinstance(argv, str) else batch_argument_problem(argv)
    if problem is not None:
        raise TaskError(problem)
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update({str(k): str(v) for k, v in env.items()})
    kwargs: dict[str, object] = {}
    if WINDOWS:
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
        guardian.start()
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

    if not WINDOWS:
        guardian.watch(proc.pid)  # its group dies with this process, however this process dies
    unregister = ctx.on_abort(lambda: kill_tree(proc))
    streaming = ctx.streaming
    out = Sink(limit, functools.partial(ctx.output, "stdout") if streaming else None)
    err = Sink(limit, functools.partial(ctx.output, "stderr") if streaming else None)
    try:
        leftovers = (_pump_threads if WINDOWS else _pump_poll)(proc, out, err)
        out.close()
        err.close()
        code = proc.wait()
    finally:
        unregister()
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait()
        if not WINDOWS:
            guardian.release(proc.pid)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    result = ProcessResult(code, out.text(), err.text(), out.dropped + err.dropped, leftovers)
    ctx.check(output=result.output, truncated_bytes=result.dropped)
    return result


def _pump_poll(proc: subprocess.Popen[bytes], out: Sink, err: Sink) -> str | None:
    """Read both pipes until EOF; says what became of background processes that still held them.

    Returns ``None`` normally, ``"killed"`` when leftovers of the process group held the pipes and were killed,
    or ``"detached"`` when something outside the group (a ``setsid`` daemon) kept them open and reading stopped.
    """
    assert proc.stdout is not None and proc.stderr is not None
    sinks = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    poller = select.poll()
    for fd in sinks:
        poller.register(fd, select.POLLIN)
    exited_at: float | None = None
    leftovers: str | None = None
    next_check = time.monotonic() + 0.1
    while sinks:
        events = poller.poll(100)
        for fd, _ in events:
            data = os.read(fd, 65536)
            if data:
                sinks[fd].feed(data)
            else:
                poller.unregister(fd)
                del sinks[fd]
        now = time.monotonic()
        if events and now < next_check:
            continue
        next_check = now + 0.1
        if exited_at is None:
            if proc.poll() is not None:
                exited_at = now
        elif now - exited_at > 2 * PIPE_GRACE:
            return "detached"  # the holder left the process group; stop waiting for it
        elif now - exited_at > PIPE_GRACE and leftovers is None:
            kill_tree(proc)  # the process is gone but what it started still holds our pipes
            leftovers = "killed"
    return leftovers


def _pump_threads(proc: subprocess.Popen[bytes], out: Sink, err: Sink) -> str | None:
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
    leftovers: str | None = None
    for t in threads:
        t.join(PIPE_GRACE)
        if t.is_alive() and leftovers is None:
            kill_tree(proc)
            leftovers = "killed"
    for t in threads:
        t.join(PIPE_GRACE)
    return "detached" if any(t.is_alive() for t in threads) else leftovers
