"""A running task's output, line by line as its work reads it, sent to ``on_event`` as ``task_output`` events.

The engine masks secrets in a task's whole output when the task ends (``Redactor.text``), and a line sent earlier
must never show what that masking hides. A line masked on its own hides every secret but a multi-line one (a key in
PEM form) whole, and those of its lines shorter than ``MIN_LINE``: so while a stream's text ends in what may be the
beginning of such a secret, or holds one that runs into its last lines, those lines are held back and masked with
what follows them. Whitespace-only lines wait for a line with text and are dropped at a stream's end, as the log
drops an output's trailing blank lines.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable

from probe.redact import MASK, MIN_LINE, Redactor

log = logging.getLogger(__name__)

Emit = Callable[[str, list[str], int], None]  # a stream's name, its lines, the number of the first (from 0)


class StreamLines:
    """One output stream of a task's attempt: takes its lines (without their line breaks) and returns, masked, those
    that may be shown now."""

    def __init__(self, redactor: Redactor, spanning: list[str]) -> None:
        self.redactor = redactor
        self.spanning = spanning  # the secrets' forms that hold a line break
        # their lines too short to be masked on their own (the result masks stdout and stderr together, each stream
        # is masked alone here): masked while a stream begins with what may be the end of such a secret
        self.short = {
            line.strip() for form in spanning for line in form.splitlines() if 0 < len(line.strip()) < MIN_LINE
        }
        self.head = True  # no line yet that is not a (masked or short) line of a multi-line secret
        self.held: list[str] = []  # lines that may be part of a multi-line secret, not masked yet
        self.unfinished = ""  # masked text after the last line break left (a mask took it: "***" + the next line)
        self.blank: list[str] = []  # whitespace-only lines, waiting for a line with text

    def add(self, lines: list[str]) -> list[str]:
        """Take complete lines; return those that may be shown now."""
        if not self.spanning:
            return self._shown([self.redactor.text(line) for line in lines])
        lines = self.held + lines
        ready = _ready(lines, self.spanning)
        self.held = lines[ready:]
        if not ready:
            return []
        pieces = (self.unfinished + self.redactor.text("".join(line + "\n" for line in lines[:ready]))).split("\n")
        self.unfinished = pieces.pop()
        return self._shown(pieces)

    def end(self, lines: list[str], cut: bool) -> list[str]:
        """The stream ended after ``lines`` (the last may have no line break; with ``cut``, the rest of the stream was
        not kept, so a secret's beginning at its end is masked too); return every line left to show."""
        text = "".join(line + "\n" for line in self.held) + "\n".join(lines)
        open_at = _open_at(text, self.spanning) if self.held else len(text)
        if open_at < len(text):  # held as the beginning of a secret that went on in the other stream, if anywhere
            masked = self.redactor.text(text[:open_at]) + MASK
        else:
            masked = self.redactor.cut_text(text) if cut else self.redactor.text(text)
        shown = self._shown((self.unfinished + masked).split("\n"))
        self.held, self.unfinished, self.blank = [], "", []
        return shown

    def _shown(self, lines: list[str]) -> list[str]:
        shown: list[str] = []
        for line in lines:
            line = line.removesuffix("\r")
            if self.head and line.strip():
                if line.strip() in self.short:
                    line = MASK
                self.head = line.strip() == MASK
            if line.strip():
                shown += self.blank
                shown.append(line)
                self.blank = []
            else:
                self.blank.append(line)
        return shown


def _ready(lines: list[str], spanning: list[str]) -> int:
    """How many of ``lines`` (each ended by a line break) may be masked and shown now: those before a line where a
    multi-line secret may begin that the text does not hold all of yet, and before one that a secret it holds
    whole runs into from an earlier line."""
    text = "\n".join(lines) + "\n"
    starts = [0]
    for line in lines[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    open_at = _open_at(text, spanning)
    ready = len(lines) if open_at == len(text) else bisect.bisect_right(starts, open_at) - 1
    moved = True
    while moved and 0 < ready < len(lines):
        moved = False
        boundary = starts[ready]
        for form in spanning:  # a form the text holds whole that crosses into the lines held
            at = text.find(form, max(0, boundary - len(form) + 1), boundary + len(form) - 1)
            if -1 < at < boundary:
                ready, moved = bisect.bisect_right(starts, at) - 1, True
                break
    return ready


def _open_at(text: str, spanning: list[str]) -> int:
    """Where the earliest beginning of a multi-line secret that runs to the end of ``text`` starts (the length of
    ``text`` when none does)."""
    open_at = len(text)
    for form in spanning:
        at = text.find(form[0], max(0, len(text) - len(form) + 1))
        while at != -1 and at < open_at:
            if form.startswith(text[at:]):
                open_at = at
                break
            at = text.find(form[0], at + 1)
    return open_at


class LiveOutput:
    """A task's output streams, sent through ``emit`` as they come: lines numbered within each attempt (the log's
    budget of lines is an attempt's, as the result holds the last attempt's output). ``lines`` and ``unstreamed``
    say, when an attempt ends, what it sent."""

    def __init__(self, redactor: Redactor, emit: Emit) -> None:
        self.redactor = redactor
        self.spanning = [form for form in redactor.values if "\n" in form]
        self.emit = emit
        self.lines = 0  # lines the current (or last) attempt sent
        self.unstreamed = 0  # bytes it read but did not keep, nor send: the streams' ends say how many
        self.lock = threading.Lock()

    def attempt(self) -> AttemptOutput:
        """The output of the next attempt, for its ``TaskContext``."""
        with self.lock:
            self.lines = self.unstreamed = 0
        return AttemptOutput(self)

    def sent(self) -> dict[str, int]:
        """The last attempt's ``streamed_lines`` and ``unstreamed_bytes``, for its event, if it sent any line."""
        return {"streamed_lines": self.lines, "unstreamed_bytes": self.unstreamed} if self.lines else {}

    def number(self, stream: str, lines: list[str]) -> tuple[str, list[str], int] | None:
        """Number lines of ``stream`` to be sent (under ``lock``; sent after it is released, so that a slow listener
        holds up only the thread that read them)."""
        if not lines:
            return None
        first, self.lines = self.lines, self.lines + len(lines)
        return stream, lines, first


class AttemptOutput:
    """One attempt's output streams, the ``emit_output`` of its ``TaskContext``: used as a context manager around the
    attempt, it takes no lines once the attempt has ended (the process of an abandoned one may still print)."""

    def __init__(self, task: LiveOutput) -> None:
        self.task = task
        self.streams: dict[str, StreamLines] = {}
        self.ended: set[str] = set()  # streams whose end came: a late piece of one (Windows' pumps) is ignored
        self.open = True

    def __enter__(self) -> AttemptOutput:
        return self

    def __exit__(self, *exc: object) -> None:
        """Send what the streams still held (masked as a cut stream's end) and take no more."""
        with self.task.lock:
            due = [self.task.number(name, stream.end([], cut=True)) for name, stream in self.streams.items()]
            self.streams, self.open = {}, False
        self._send(due)

    def __call__(self, stream: str, lines: list[str], *, last: bool = False, dropped: int = 0) -> None:
        """``TaskContext.output``: lines of ``stream``; with ``last``, its end and the bytes of it not kept."""
        task = self.task
        with task.lock:
            if not self.open or stream in self.ended:
                return
            try:
                lines_of = self.streams.get(stream)
                if lines_of is None:
                    lines_of = self.streams[stream] = StreamLines(task.redactor, task.spanning)
                if last:
                    del self.streams[stream]
                    self.ended.add(stream)
                    task.unstreamed += dropped
                    due = task.number(stream, lines_of.end(lines, cut=dropped > 0))
                else:
                    due = task.number(stream, lines_of.add(lines))
            except Exception:  # a bug here must not fail the task: its result keeps the output
                log.exception("task %s: its output cannot be sent line by line; the rest is not", task)
                self.open = False
                return
        self._send([due])

    def _send(self, due: list[tuple[str, list[str], int] | None]) -> None:
        for numbered in due:
            if numbered is not None:
                self.task.emit(*numbered)
