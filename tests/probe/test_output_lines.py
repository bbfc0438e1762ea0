"""A task's output sent line by line as its process prints it (``task_output`` events), masked as its result is."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

import probe
from probe.outputlines import StreamLines
from probe.redact import Redactor
from probe.results import TRUNCATION_MARKER, Status

PY = sys.executable
RunYaml = Callable[..., probe.WorkflowResult]
KEY = "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nab\nkq3rT8uVbXn2Yp0wQeLmZs\n-----END KEY-----"


class Recorder:
    """An ``on_event`` that keeps each event with the monotonic time it came."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append((time.monotonic(), event))

    def output(self, stream: str | None = None) -> list[str]:
        return [
            line
            for _, event in self.events
            if event["event"] == "task_output" and stream in (None, event["stream"])
            for line in event["lines"]
        ]

    def at(self, kind: str, line: str | None = None) -> float:
        return next(
            when for when, event in self.events if event["event"] == kind and (line is None or line in event["lines"])
        )

    def finished(self) -> dict[str, Any]:
        return next(event for _, event in self.events if event["event"] == "task_finished")


def python_task(code: str, *, timeout: str | None = None, env: str = "") -> str:
    """A workflow of one command task running ``code`` in Python, with ``env`` its env mapping (YAML)."""
    limit = f", timeout: {timeout}" if timeout else ""
    environment = f", env: {env}" if env else ""
    return (
        f"name: out\ntasks:\n  - {{name: talk, type: command{limit}, config: {{command: {PY}, "
        f"args: ['-u', '-c', {code!r}]{environment}}}}}\n"
    )


def test_each_line_is_sent_as_the_process_prints_it_long_before_it_ends(run_yaml: RunYaml) -> None:
    events = Recorder()
    code = "import sys, time; print('first'); time.sleep(1.5); print('second'); print('oops', file=sys.stderr)"
    result = run_yaml(python_task(code), on_event=events)
    assert result.success
    assert events.output() == ["first", "second", "oops"]
    assert events.output("stderr") == ["oops"]
    assert events.at("task_finished") - events.at("task_output", "first") > 1.0
    assert events.at("task_finished") - events.at("task_output", "second") < 1.0
    numbers = [event["first"] for _, event in events.events if event["event"] == "task_output"]
    assert numbers == sorted(set(numbers)) and numbers[0] == 0
    assert events.finished()["streamed_lines"] == 3 and events.finished()["unstreamed_bytes"] == 0
    assert result.tasks[0].output == "first\nsecond\noops\n"  # the result is as it was


def test_a_last_line_without_a_line_break_is_sent_when_the_process_ends(run_yaml: RunYaml) -> None:
    events = Recorder()
    run_yaml(
        "name: p\ntasks:\n  - {name: p, type: command, config: {command: \"printf 'a\\\\n\\\\nb'\", shell: true}}\n",
        on_event=events,
    )
    assert events.output() == ["a", "", "b"]


def test_trailing_blank_lines_are_not_sent(run_yaml: RunYaml) -> None:
    events = Recorder()
    run_yaml(python_task("print('a'); print(); print('  ')"), on_event=events)
    assert events.output() == ["a"]


def test_a_secret_never_shows_in_a_line_sent_nor_its_upper_or_lower_case(run_yaml: RunYaml) -> None:
    events = Recorder()
    secret = "Hunter2-Very-Secret"
    code = "import os; s = os.environ['S']; print('pw=' + s); print(s.upper()); print(s.lower() + ' again')"
    result = run_yaml(python_task(code, env="{S: '{{.secrets.S}}'}"), secrets={"S": secret}, on_event=events)
    assert events.output() == ["pw=***", "***", "*** again"]
    assert events.output() == result.tasks[0].output.splitlines()


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        (KEY, ["key follows:", "***", "one line alone: ***", "and ab alone"]),
        (KEY + "\n", ["key follows:", "***one line alone: ***", "and ab alone"]),  # the mask takes the line break
    ],
    ids=["key", "key-and-line-break"],
)
def test_a_multi_line_secret_is_masked_in_lines_sent_as_in_the_result_even_when_printed_in_pieces(
    run_yaml: RunYaml, secret: str, expected: list[str]
) -> None:
    """The key's short line "ab" is masked only as part of the whole key: the lines before it wait for the rest."""
    events = Recorder()
    code = (
        "import os, sys, time\n"
        "key = os.environ['K']\n"
        "print('key follows:')\n"
        "for line in key.splitlines():\n"
        "    print(line); time.sleep(0.1)\n"
        "print('one line alone: ' + key.splitlines()[1])\n"
        "print('and ab alone')\n"
    )
    result = run_yaml(python_task(code, env="{K: '{{.secrets.K}}'}"), secrets={"K": secret}, on_event=events)
    shown = events.output()
    assert shown == result.tasks[0].output.splitlines() == expected
    assert not [line for line in shown if "MIIEvQ" in line or "kq3rT8" in line or "BEGIN KEY" in line]


@pytest.mark.parametrize("secret", [KEY, KEY + "\n", "abc\n"], ids=["key", "key-and-line-break", "short-line"])
def test_lines_held_for_a_multi_line_secret_are_masked_alike_however_the_reads_cut_them(secret: str) -> None:
    """Masked as the result's output, line breaks included: a secret that ends with one takes it ("x***y")."""
    redactor = Redactor([secret])
    spanning = [form for form in redactor.values if "\n" in form]
    text = f"start\n{secret}middle -----BEGIN KEY-----\nnot the key\nab\nxabc\n{secret.upper()} end\nlast"
    expected = redactor.text(text).split("\n")
    lines = text.split("\n")
    for first, second in itertools.combinations(range(len(lines)), 2):
        stream = StreamLines(redactor, spanning)
        shown = stream.add(lines[:first]) + stream.add(lines[first:second]) + stream.end(lines[second:], cut=False)
        assert shown == expected, (first, second)


def test_a_timed_out_command_keeps_the_lines_it_sent_and_sends_each_once(run_yaml: RunYaml) -> None:
    events = Recorder()
    code = "import time; print('before'); print('partial', end=''); time.sleep(30)"
    started = time.monotonic()
    result = run_yaml(python_task(code, timeout="1s"), on_event=events)
    assert time.monotonic() - started < 5
    task = result.tasks[0]
    assert task.status is Status.TIMED_OUT
    assert events.output() == ["before", "partial"]
    assert task.output == "before\npartial"
    assert events.finished()["streamed_lines"] == 2


def test_only_the_output_kept_is_sent_and_the_bytes_not_kept_are_counted(run_yaml: RunYaml) -> None:
    events = Recorder()
    result = run_yaml(python_task("[print(n) for n in range(1, 1001)]"), on_event=events, output_limit=100)
    printed = sum(len(f"{n}\n") for n in range(1, 1001))
    kept = result.tasks[0].output.removesuffix(TRUNCATION_MARKER.format(dropped=printed - 100))
    assert events.output() == kept.splitlines()
    assert events.finished()["unstreamed_bytes"] == printed - 100


def test_nothing_is_cut_into_lines_without_a_listener(run_yaml: RunYaml) -> None:
    contexts: list[probe.TaskContext] = []

    class Watching(probe.TaskType):
        name = "test-watching"

        def run(self, config: dict[str, Any], ctx: probe.TaskContext) -> probe.Outcome:
            contexts.append(ctx)
            return probe.Outcome(True)

    probe.registry.add(Watching)
    try:
        run_yaml("name: w\ntasks:\n  - {name: a, type: test-watching}\n")
        run_yaml("name: w\ntasks:\n  - {name: a, type: test-watching}\n", on_event=lambda event: None)
    finally:
        probe.registry.pop("test-watching")
    assert [ctx.streaming for ctx in contexts] == [False, True]


def test_a_task_type_that_gives_its_output_at_the_end_sends_no_output_event(run_yaml: RunYaml, http_server) -> None:
    events = Recorder()
    http_server.route("/health", body="all\ngood\n")
    run_yaml(
        'name: web\ntasks:\n  - {name: call, type: http, config: {url: "{{.BASE}}/health"}}\n',
        variables={"BASE": http_server.url},
        on_event=events,
    )
    assert events.output() == []
    assert "streamed_lines" not in events.finished()
    assert events.finished()["result"]["output"] == "all\ngood\n"


class _Late(probe.TaskType):
    """Hands over a line, ignores being stopped for ``seconds``, then hands over another."""

    name = "test-late"
    options = {"seconds": probe.Option("number", default=0)}

    def run(self, config: dict[str, Any], ctx: probe.TaskContext) -> probe.Outcome:
        ctx.output("stdout", ["early"])
        time.sleep(config["seconds"])
        ctx.output("stdout", ["late"], last=True)
        return probe.Outcome(True, "early\nlate\n")


def test_an_abandoned_attempt_sends_no_line_once_it_has_ended_not_even_into_the_next_attempt(
    run_yaml: RunYaml,
) -> None:
    events = Recorder()
    probe.registry.add(_Late)
    try:
        started = time.monotonic()
        result = run_yaml(
            "name: l\ntasks:\n  - {name: a, type: test-late, timeout: 200ms, retries: 1, retry_delay: 0s,"
            " config: {seconds: 2.5}}\n",
            on_event=events,
        )
        time.sleep(max(0.0, started + 5.5 - time.monotonic()))  # both attempts' "late" were handed over by now
    finally:
        probe.registry.pop("test-late")
    assert result.tasks[0].status is Status.TIMED_OUT and result.tasks[0].attempts == 2
    assert events.output() == ["early", "early"]
    # each attempt's lines are numbered from 0: the log's budget of lines is an attempt's
    assert [event["first"] for _, event in events.events if event["event"] == "task_output"] == [0, 0]


@pytest.mark.parametrize(
    ("secret", "pad"),
    [("pass§word-Zq9", 995), ("geheim-pässwort-ÄÖÜ", 991), ("hunter2-😀-tail", 990)],
    ids=["cut-in-section-sign", "cut-in-umlaut", "cut-in-emoji"],
)
def test_a_secret_cut_at_the_limit_inside_a_character_is_masked_in_the_result_and_the_lines(
    run_yaml: RunYaml, secret: str, pad: int
) -> None:
    """The cut falls inside a character of the secret: decoded alone, the kept bytes ended in U+FFFD, and the
    secret's beginning before it was not seen as the end of the output, so not masked (the result leaked it too
    when the character was an emoji)."""
    events = Recorder()
    code = f"import os, sys; sys.stdout.buffer.write(b'a' * {pad} + os.environ['S'].encode() + b'\\n')"
    result = run_yaml(
        python_task(code, env="{S: '{{.secrets.S}}'}"), secrets={"S": secret}, on_event=events, output_limit=1000
    )
    kept = secret.encode()[: 1000 - pad]
    cut = kept.decode("utf-8", "ignore")
    assert len(cut.encode()) < len(kept)  # the limit falls inside one of the secret's characters
    for text in (result.tasks[0].output, *events.output()):
        assert cut[:6] not in text and "\ufffd" not in text, text[-60:]


def test_a_multi_line_secret_split_between_stdout_and_stderr_shows_none_of_its_lines(run_yaml: RunYaml) -> None:
    """The result masks stdout and stderr together, the lines each stream alone: the key's short line "ab" must not
    show on either side of the split."""
    lines = KEY.split("\n")
    for split in range(1, len(lines)):
        events = Recorder()
        head, tail = "\n".join(lines[:split]), "\n".join(lines[split:])
        code = (
            f"import sys, time; sys.stdout.write('start\\n' + {head!r} + '\\n'); sys.stdout.flush(); time.sleep(0.2); "
            f"sys.stderr.write({tail!r} + '\\nend\\n')"
        )
        result = run_yaml(python_task(code), secrets={"K": KEY}, on_event=events)
        shown = events.output()
        assert "ab" not in shown and not [line for line in shown if "MIIEvQ" in line or "kq3rT8" in line], (
            split,
            shown,
        )
        assert "ab" not in result.tasks[0].output.splitlines(), split
        assert shown[0] == "start" and "end" in shown and set(shown) <= {"start", "***", "end"}, (split, shown)


def test_a_progress_bar_drawn_with_carriage_returns_is_sent_a_line_per_step_as_it_is_drawn(run_yaml: RunYaml) -> None:
    events = Recorder()
    code = (
        "import sys, time; sys.stdout.write('10%\\r'); sys.stdout.flush(); time.sleep(1); "
        "sys.stdout.write('20%\\r\\n30%\\r\\ndone\\n')"
    )
    result = run_yaml(python_task(code), on_event=events)
    assert result.success and events.output() == ["10%", "20%", "30%", "done"]
    assert events.at("task_output", "10%") < events.at("task_finished") - 0.8  # sent before any "\n" came
