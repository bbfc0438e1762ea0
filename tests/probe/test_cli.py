"""The probe command line: run, validate, tasks, and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROBE = [sys.executable, "-m", "probe.cli"]


def probe_cli(*args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PROBE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture
def workflow_file(tmp_path: Path):
    def write(text: str) -> str:
        path = tmp_path / "wf.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_run_prints_a_line_as_each_task_starts_and_finishes_and_exits_0(workflow_file):
    path = workflow_file(
        "name: hi\ntasks:\n  - {name: greet, type: command, config: {command: echo, args: ['{{.WHO}}']}}\n"
        "  - {name: done, type: command, config: {command: 'true'}}\n"
    )
    proc = probe_cli("run", path, "--var", "WHO=world")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "▶ greet (command)"
    assert lines[1].startswith("✓ greet succeeded in ")
    assert lines[2] == "▶ done (command)"
    assert lines[-1].startswith("✓ workflow hi succeeded in ") and lines[-1].endswith("(2 succeeded)")


def test_run_exits_1_when_the_workflow_fails(workflow_file):
    path = workflow_file(
        "name: f\ntasks:\n  - {name: a, type: command, config: {command: 'false'}}\n"
        "  - {name: b, type: command, config: {command: 'true'}}\n"
    )
    proc = probe_cli("run", path)
    assert proc.returncode == 1
    assert "✗ a failed in" in proc.stdout and "- b skipped" in proc.stdout


def test_run_exits_2_for_an_invalid_workflow_with_its_line(workflow_file):
    path = workflow_file("name: f\ntasks:\n  - {name: a, type: comand, config: {}}\n")
    proc = probe_cli("run", path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"{path}: tasks[0] (a).type: unknown task type 'comand'; did you mean 'command'? (line 3)"
    )


def test_run_exits_2_for_malformed_arguments(workflow_file):
    path = workflow_file("name: f\ntasks:\n  - {name: a, type: command, config: {command: 'true'}}\n")
    assert probe_cli("run", path, "--var", "novalue").returncode == 2
    assert probe_cli("run", path, "--timeout", "soon").returncode == 2
    assert probe_cli("run").returncode == 2
    assert probe_cli("run", path + ".missing.yaml").returncode == 2


def test_run_json_prints_the_workflow_result_with_secrets_masked(workflow_file):
    path = workflow_file(
        "name: j\ntasks:\n  - {name: a, type: command, config: {command: echo, args: ['{{.secrets.PW}}']}}\n"
    )
    proc = probe_cli("run", path, "--json", "--secret", "PW=s3cret-value")
    assert proc.returncode == 0
    data = json.loads(proc.stdout)
    assert data["status"] == "succeeded" and data["tasks"][0]["output"] == "***\n"
    assert "s3cret-value" not in proc.stdout + proc.stderr


def test_a_secret_can_come_from_the_environment(workflow_file):
    path = workflow_file(
        "name: j\ntasks:\n  - {name: a, type: command, config: {command: echo, args: ['{{.secrets.PW}}']}}\n"
    )
    proc = probe_cli("run", path, "--json", "-q", "--secret", "PW", env={"PW": "from-env-secret"})
    assert json.loads(proc.stdout)["tasks"][0]["output"] == "***\n"
    assert proc.stderr == ""


def test_run_timeout_limits_the_whole_run(workflow_file):
    path = workflow_file("name: t\ntasks:\n  - {name: a, type: command, config: {command: sleep, args: ['30']}}\n")
    started = time.monotonic()
    proc = probe_cli("run", path, "--timeout", "500ms")
    assert proc.returncode == 1 and time.monotonic() - started < 5
    assert "timed_out" in proc.stdout


def test_an_interrupt_cancels_the_run_and_exits_130(workflow_file):
    path = workflow_file("name: t\ntasks:\n  - {name: a, type: command, config: {command: sleep, args: ['30']}}\n")
    proc = subprocess.Popen([*PROBE, "run", path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the task has started: the run's interrupt handler is in place
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert first.strip() and proc.returncode == 130
    assert "cancelled" in first + out


def test_validate_reports_every_error_of_every_file(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text("name: g\ntasks:\n  - {name: a, type: command, config: {command: 'true'}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nfoo: 1\ntasks:\n  - {name: a, type: command, config: {}}\n")
    proc = probe_cli("validate", str(good), str(bad))
    assert proc.returncode == 2
    assert f"{good}: valid (1 task)" in proc.stdout
    assert proc.stderr.splitlines() == [
        f"{bad}: unknown key 'foo' (line 2)",
        f"{bad}: tasks[0] (a).config: required option 'command' is missing (line 4)",
    ]
    assert probe_cli("validate", str(good)).returncode == 0


def test_validate_strict_requires_every_variable(tmp_path: Path):
    path = tmp_path / "v.yaml"
    path.write_text("name: v\ntasks:\n  - {name: a, type: command, config: {command: '{{.UNSET_VAR_X}}'}}\n")
    assert probe_cli("validate", str(path)).returncode == 0
    proc = probe_cli("validate", "--strict", str(path))
    assert proc.returncode == 2 and "variable 'UNSET_VAR_X' is not defined" in proc.stderr
    assert probe_cli("validate", "--strict", "--var", "UNSET_VAR_X=ls", str(path)).returncode == 0


def test_tasks_lists_every_type_with_its_options():
    proc = probe_cli("tasks", "--json")
    assert proc.returncode == 0
    types = json.loads(proc.stdout)
    assert {"command", "powershell"} <= set(types)
    assert types["command"]["options"]["command"]["required"] is True
    assert types["powershell"]["platforms"] == ["windows"]
    human = probe_cli("tasks")
    assert human.stdout.startswith("command: run a local program")
