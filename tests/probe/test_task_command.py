"""The command and powershell task types against real processes."""

from __future__ import annotations

import base64
import os
import sys
import threading

import pytest

import probe
from probe.process import batch_argument_problem
from probe.tasks import powershell
from probe.tasks.command import SHELL_WITH_ARGS

PY = sys.executable


def test_arguments_are_passed_without_a_shell(run_yaml):
    result = run_yaml(
        f"""\
        name: no-shell
        tasks:
          - name: argv
            type: command
            config:
              command: {PY}
              args: ["-c", "import sys; print(sys.argv[1:])", "$HOME", "a b", "; rm -rf /", "*"]
        """
    )
    assert result.tasks[0].output == "['$HOME', 'a b', '; rm -rf /', '*']\n"


def test_a_list_command_is_the_whole_argv(run_yaml):
    result = run_yaml(
        f"name: l\ntasks:\n  - {{name: a, type: command, config: {{command: ['{PY}', '-c', 'print(7)']}}}}\n"
    )
    assert result.tasks[0].output == "7\n"


def test_shell_true_runs_one_command_line(run_yaml):
    result = run_yaml(
        "name: sh\ntasks:\n  - {name: a, type: command, config: {command: 'echo $((6 * 7)) | tr 4 x', shell: true}}\n"
    )
    assert result.tasks[0].output == "x2\n"


def test_env_and_cwd_are_applied(run_yaml, tmp_path):
    result = run_yaml(
        f"""\
        name: env
        tasks:
          - name: a
            type: command
            config:
              command: {PY}
              args: ["-c", "import os; print(os.environ['GREETING'], os.getcwd())"]
              env: {{GREETING: hello}}
              cwd: {tmp_path}
        """
    )
    assert result.tasks[0].output == f"hello {tmp_path}\n"
    assert "GREETING" not in os.environ


def test_expected_exit_codes_decide_success(run_yaml):
    result = run_yaml(
        """\
        name: codes
        tasks:
          - {name: three, type: command, config: {command: sh, args: ["-c", "exit 3"], expected_exit_codes: [0, 3]}}
          - {name: zero, type: command, config: {command: "true", expected_exit_codes: [1]}}
        """
    )
    assert result.tasks[0].status is probe.Status.SUCCEEDED
    assert result.tasks[0].metrics["exit_code"] == 3
    assert result.tasks[1].status is probe.Status.FAILED
    assert result.tasks[1].error == "exit code 0 (expected 1)"


def test_stdout_and_stderr_are_read_concurrently_without_deadlock(run_yaml):
    script = "import sys\nfor _ in range(2000):\n    sys.stderr.write('e' * 100)\n    sys.stdout.write('o' * 100)\n"
    result = run_yaml(
        f"name: big\ntasks:\n  - name: a\n    type: command\n    timeout: 10s\n"
        f"    config: {{command: {PY}, args: ['-c', {script!r}]}}\n"
    )
    assert result.tasks[0].status is probe.Status.SUCCEEDED
    assert result.tasks[0].output.count("o") >= 64 * 1024 - 10


def test_stderr_is_in_the_error_of_a_failed_command(run_yaml):
    result = run_yaml(
        "name: e\ntasks:\n  - name: a\n    type: command\n"
        "    config: {command: sh, args: ['-c', 'echo broken >&2; exit 4']}\n"
    )
    assert result.tasks[0].error == "exit code 4 (expected 0): broken"
    assert result.tasks[0].output == "broken\n"


def test_a_missing_program_is_an_error(run_yaml):
    result = run_yaml("name: m\ntasks:\n  - {name: a, type: command, config: {command: /no/such/program}}\n")
    assert result.tasks[0].status is probe.Status.ERROR
    assert result.tasks[0].error.startswith("cannot start /no/such/program")


def test_a_background_child_holding_the_output_does_not_hang_the_task(run_yaml):
    result = run_yaml(
        "name: bg\ntasks:\n  - name: a\n    type: command\n    timeout: 10s\n"
        "    config: {command: 'sleep 20 & echo started', shell: true}\n"
    )
    assert result.tasks[0].status is probe.Status.SUCCEEDED
    assert result.tasks[0].metrics["duration_ms"] < 3000


def test_args_with_shell_are_refused_at_load(load_error):
    error = load_error("name: x\ntasks:\n  - {name: a, type: command, config: {command: ls, shell: true, args: [x]}}\n")
    assert SHELL_WITH_ARGS in str(error)


def test_powershell_scripts_are_passed_encoded_as_utf16(monkeypatch):
    encoded = powershell.encode_script("Write-Output 'héllo'")
    assert base64.b64decode(encoded).decode("utf-16-le") == "Write-Output 'héllo'"


def test_powershell_without_a_powershell_on_the_host_is_a_clear_error(run_yaml, monkeypatch):
    monkeypatch.setattr(powershell, "find_powershell", lambda: None)
    result = run_yaml("name: p\ntasks:\n  - {name: a, type: powershell, config: {script: Get-Date}}\n")
    assert result.tasks[0].status is probe.Status.ERROR
    assert result.tasks[0].error == powershell.NO_POWERSHELL


def test_powershell_runs_the_script_with_no_profile_and_its_exit_code(run_yaml, monkeypatch, tmp_path):
    # A stand-in executable that records its arguments and decodes the script, in place of pwsh.
    fake = tmp_path / "pwsh"
    fake.write_text(
        f"#!{PY}\nimport base64, sys\nargs = sys.argv[1:]\nprint(args[:3])\n"
        "print(base64.b64decode(args[3]).decode('utf-16-le'))\nsys.exit(5)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(powershell, "find_powershell", lambda: str(fake))
    result = run_yaml(
        "name: p\ntasks:\n  - name: a\n    type: powershell\n    config:\n      script: \"Exit 5 # 'quoted' $x\"\n"
        "      expected_exit_codes: [5]\n"
    )
    assert result.tasks[0].status is probe.Status.SUCCEEDED, result.tasks[0].error
    assert result.tasks[0].output == "['-NoProfile', '-NonInteractive', '-EncodedCommand']\nExit 5 # 'quoted' $x\n"


def test_a_detached_daemon_holding_the_output_does_not_hang_the_task(run_yaml):
    events: list[dict] = []
    result = run_yaml(
        "name: bg\ntasks:\n  - name: a\n    type: command\n    timeout: 20s\n"
        "    config: {command: 'setsid sleep 8 & echo started', shell: true}\n",
        on_event=events.append,
    )
    assert result.tasks[0].status is probe.Status.SUCCEEDED
    assert result.tasks[0].metrics["duration_ms"] < 4000
    assert any(e["event"] == "task_log" and "detached" in e["message"] for e in events)


@pytest.mark.parametrize(
    ("argv", "refused"),
    [
        (["deploy.bat", "web1", "--fast"], None),
        (["C:\\tools\\Deploy.CMD", "a&calc.exe"], "'&' in argument 1"),
        (["deploy.bat", "ok", 'x" & whoami'], "'\"' in argument 2"),
        (["deploy.bat", "100%"], "'%' in argument 1"),
        (["deploy.bat. .", "a|b"], "'|' in argument 1"),  # Windows runs deploy.bat
        (["deploy.exe", "a&b"], None),  # a program, not cmd.exe: its arguments are passed as they are
    ],
)
def test_a_batch_file_on_windows_takes_no_argument_cmd_would_interpret(argv: list[str], refused: str | None) -> None:

    problem = batch_argument_problem(argv, windows=True)
    assert (problem is None) if refused is None else (problem is not None and refused in problem), problem
    assert batch_argument_problem(argv, windows=False) is None  # elsewhere a .bat is an ordinary file name


@pytest.mark.parametrize("stop", ["timeout", "cancel"])
def test_a_stopped_command_keeps_the_output_it_wrote_masked_in_its_result_and_events(run_yaml, stop):
    events: list[dict] = []
    cancel = threading.Event()

    def on_event(event: dict) -> None:
        events.append(event)
        if stop == "cancel" and event["event"] == "task_started":
            threading.Timer(1, cancel.set).start()

    result = run_yaml(
        f"""\
        name: hung
        tasks:
          - name: a
            type: command
            timeout: {"1s" if stop == "timeout" else "20s"}
            config: {{command: "echo begin {{{{.secrets.TOKEN}}}}; sleep 30", shell: true}}
        """,
        secrets={"TOKEN": "hunter2-token"},
        cancel=cancel,
        on_event=on_event,
    )
    task = result.tasks[0]
    assert task.status is (probe.Status.TIMED_OUT if stop == "timeout" else probe.Status.CANCELLED)
    assert task.error == ("timed out (its timeout)" if stop == "timeout" else "cancelled")
    assert task.output == "begin ***\n"
    (finished,) = [e for e in events if e["event"] == "task_finished"]
    assert finished["result"]["output"] == "begin ***\n"
