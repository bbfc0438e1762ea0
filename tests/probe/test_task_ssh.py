"""The ssh task type against the real OpenSSH server of the test harness."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import probe
from probe.results import Status
from probe.tasks import ssh  # importing the module registers the type
from tests.servers._util import free_port, wait_for

pytestmark = pytest.mark.timeout(60)


def server_config(server: Any, **extra: Any) -> dict[str, Any]:
    """Return the options that reach the harness's sshd with its key and known_hosts."""
    config = {
        "host": server.host,
        "port": server.port,
        "user": server.user,
        "key": server.client_key,
        "known_hosts": server.known_hosts,
    }
    config.update(extra)
    return {k: v for k, v in config.items() if v is not None}


def workflow_text(config: dict[str, Any], timeout: str | None = None) -> str:
    """Return a one-task ssh workflow as YAML."""
    task: dict[str, Any] = {"name": "remote", "type": "ssh", "config": config}
    if timeout is not None:
        task["timeout"] = timeout
    return yaml.safe_dump({"name": "ssh-test", "timeout": "30s", "tasks": [task]})


def run_ssh(config: dict[str, Any], timeout: str | None = "10s", **kwargs: Any) -> probe.TaskResult:
    """Run one ssh task through the public API and return its result."""
    return probe.run_workflow(probe.load_workflow(workflow_text(config, timeout)), **kwargs).tasks[0]


def load_problems(config: dict[str, Any]) -> str:
    """Return the load-time error of a workflow with this ssh task."""
    with pytest.raises(probe.WorkflowError) as info:
        probe.load_workflow(workflow_text(config))
    return str(info.value)


def unique_sleep() -> tuple[str, str]:
    """Return a `sleep` command that no other process has in its command line, and that marker."""
    marker = f"30.{random.randrange(10**6):06d}"
    return f"sleep {marker}", marker


def live_processes(marker: str) -> list[psutil.Process]:
    """Return the processes (zombies aside) whose command line holds ``marker``."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def new_key_file(path: Path, password: bytes | None = None, key: Ed25519PrivateKey | None = None) -> str:
    """Write an OpenSSH ed25519 private key (a new one unless given), encrypted when a password is given."""
    key = key or Ed25519PrivateKey.generate()
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption))
    return str(path)


def test_a_command_gives_its_output_and_exit_code(sshd_server):
    result = run_ssh(server_config(sshd_server, command="echo hello; echo note >&2"))
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output == "hello\nnote\n"
    assert result.metrics["exit_code"] == 0


def test_a_non_zero_exit_fails_the_task_with_stderr_in_the_error(sshd_server):
    result = run_ssh(server_config(sshd_server, command="echo partial; echo disk full >&2; exit 3"))
    assert result.status is Status.FAILED
    assert result.metrics["exit_code"] == 3
    assert result.error == "exit code 3 (expected 0): disk full"
    assert result.output == "partial\ndisk full\n"


def test_options_given_as_placeholders_are_rendered(sshd_server):
    real = server_config(sshd_server, command="echo rendered")
    variables = {name.upper(): str(value) for name, value in real.items()}
    result = run_ssh({name: "{{." + name.upper() + "}}" for name in real}, variables=variables)
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output == "rendered\n"


def test_env_values_reach_the_command_literally_and_workdir_is_entered(sshd_server, tmp_path):
    workdir = tmp_path / "a dir"
    workdir.mkdir()
    trap = tmp_path / "injected"
    value = f'it\'s "$HOME" $(touch {trap}) `touch {trap}`; touch {trap}'
    config = server_config(
        sshd_server, command='printf "%s|%s\\n" "$GREETING" "$PWD"', env={"GREETING": value}, workdir=str(workdir)
    )
    result = run_ssh(config)
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output == f"{value}|{workdir}\n"
    assert not trap.exists()


def test_a_missing_workdir_fails_before_the_command_runs(sshd_server, tmp_path):
    result = run_ssh(server_config(sshd_server, command="echo ran", workdir=str(tmp_path / "nowhere")))
    assert result.status is Status.FAILED
    assert "ran" not in result.output
    assert "nowhere" in str(result.error)


def test_paths_under_home_are_resolved_on_the_host(sshd_server, tmp_path):
    local = tmp_path / "note.txt"
    local.write_text("from home\n")
    name = f"probe-ssh-test-{random.randrange(10**9)}.txt"
    try:
        config = server_config(sshd_server, upload={"local": str(local), "remote": f"~/{name}"}, workdir="~")
        result = run_ssh({**config, "command": f"cat {name}; pwd"})
        assert result.status is Status.SUCCEEDED, result.error
        assert result.output.endswith(f"from home\n{Path.home()}\n")
    finally:
        (Path.home() / name).unlink(missing_ok=True)


def test_a_command_that_reads_stdin_sees_its_end_at_once(sshd_server):
    result = run_ssh(server_config(sshd_server, command="cat; echo after"), timeout="5s")
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output == "after\n"


def test_output_is_bounded_with_a_visible_marker(sshd_server):
    command = "head -c 200000 /dev/zero | tr '\\0' a; head -c 200000 /dev/zero | tr '\\0' b >&2"
    result = run_ssh(server_config(sshd_server, command=command), output_limit=1000)
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output.startswith("a" * 1000)
    assert "more bytes not shown" in result.output
    assert len(result.output) < 1200


def test_a_background_process_holding_the_output_does_not_hold_the_task(sshd_server):
    sleeper, marker = unique_sleep()
    started = time.monotonic()
    try:
        result = run_ssh(server_config(sshd_server, command=f"{sleeper} & echo started"))
        assert result.status is Status.SUCCEEDED, result.error
        assert result.output == "started\n"
        assert time.monotonic() - started < 5
    finally:
        for proc in live_processes(marker):
            proc.kill()


def test_an_upload_runs_before_the_command_and_reports_its_size(sshd_server, tmp_path):
    local = tmp_path / "build.txt"
    local.write_bytes(b"artifact v1\n" * 100)
    remote = tmp_path / "remote" / "build.txt"
    remote.parent.mkdir()
    config = server_config(
        sshd_server, upload={"local": str(local), "remote": str(remote)}, command=f"wc -c < {remote}"
    )
    result = run_ssh(config)
    assert result.status is Status.SUCCEEDED, result.error
    assert remote.read_bytes() == local.read_bytes()
    assert result.metrics["bytes_uploaded"] == 1200
    assert result.output == f"uploaded {local} to {sshd_server.host}:{remote} (1200 bytes)\n1200\n"


def test_an_upload_alone_into_a_directory_keeps_the_file_name(sshd_server, tmp_path):
    local = tmp_path / "tool.sh"
    local.write_text("#!/bin/sh\n")
    target = tmp_path / "bin"
    target.mkdir()
    result = run_ssh(server_config(sshd_server, upload={"local": str(local), "remote": f"{target}/"}))
    assert result.status is Status.SUCCEEDED, result.error
    assert (target / "tool.sh").read_text() == "#!/bin/sh\n"
    assert "exit_code" not in result.metrics


def test_an_upload_to_an_existing_directory_lands_inside_it_and_reports_the_full_path(sshd_server, tmp_path):
    local = tmp_path / "tool.sh"
    local.write_text("#!/bin/sh\n")
    target = tmp_path / "bin"
    target.mkdir()
    result = run_ssh(server_config(sshd_server, upload={"local": str(local), "remote": str(target)}))
    assert result.status is Status.SUCCEEDED, result.error
    assert (target / "tool.sh").read_text() == "#!/bin/sh\n"
    assert result.output == f"uploaded {local} to {sshd_server.host}:{target}/tool.sh (10 bytes)\n"


def test_an_upload_to_a_missing_directory_is_an_error_and_the_command_does_not_run(sshd_server, tmp_path):
    local = tmp_path / "a.txt"
    local.write_text("x")
    marker = tmp_path / "ran"
    config = server_config(
        sshd_server, upload={"local": str(local), "remote": str(tmp_path / "no" / "a.txt")}, command=f"touch {marker}"
    )
    result = run_ssh(config)
    assert result.status is Status.ERROR
    assert str(result.error).startswith(f"upload of {local} to {sshd_server.host}:{tmp_path}/no/a.txt failed:")
    assert not marker.exists()


def test_a_missing_local_file_is_an_error(sshd_server, tmp_path):
    missing = tmp_path / "missing.tar.gz"
    result = run_ssh(server_config(sshd_server, upload={"local": str(missing), "remote": "/tmp/x"}))
    assert result.status is Status.ERROR
    assert result.error == ssh.LOCAL_MISSING.format(path=missing)


def test_an_unknown_host_key_is_refused_and_nothing_is_written(sshd_server, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    marker = tmp_path / "ran"
    result = run_ssh(server_config(sshd_server, known_hosts=str(known_hosts), command=f"touch {marker}"))
    assert result.status is Status.ERROR
    where = f"[{sshd_server.host}]:{sshd_server.port}"
    assert result.error == ssh.UNKNOWN_HOST_KEY.format(host=where, known_hosts=known_hosts)
    assert known_hosts.read_text() == ""
    assert not marker.exists()


def test_a_missing_known_hosts_file_refuses_the_host_and_is_not_created(sshd_server, tmp_path):
    known_hosts = tmp_path / "ssh" / "known_hosts"
    result = run_ssh(server_config(sshd_server, known_hosts=str(known_hosts), command="true"))
    assert result.status is Status.ERROR
    assert "is not in" in str(result.error)
    assert not known_hosts.parent.exists()


def test_a_changed_host_key_is_refused(sshd_server, tmp_path):
    other = Ed25519PrivateKey.generate().public_key()
    line = other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[{sshd_server.host}]:{sshd_server.port} {line}\n")
    result = run_ssh(server_config(sshd_server, known_hosts=str(known_hosts), command="true"))
    assert result.status is Status.ERROR
    assert str(result.error).startswith(f"host key for [{sshd_server.host}]:{sshd_server.port} does not match")
    assert known_hosts.read_text() == f"[{sshd_server.host}]:{sshd_server.port} {line}\n"


def test_insecure_ignore_host_key_connects_and_warns_first(sshd_server, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    config = server_config(sshd_server, known_hosts=str(known_hosts), insecure_ignore_host_key=True, command="echo in")
    events: list[dict[str, Any]] = []
    result = run_ssh(config, on_event=events.append)
    assert result.status is Status.SUCCEEDED, result.error
    warning = f"WARNING: host key of {sshd_server.host}:{sshd_server.port} not verified (insecure_ignore_host_key)"
    assert result.output == f"{warning}\nin\n"
    assert any(e["event"] == "task_log" and e["level"] == "warning" for e in events)
    assert not known_hosts.exists()


def test_the_users_ssh_and_fabric_config_files_are_not_read(sshd_server, tmp_path, monkeypatch):
    home, marker = tmp_path / "home", tmp_path / "proxy-ran"
    (home / ".ssh").mkdir(parents=True)
    redirect = f"Host *\n  HostName 192.0.2.1\n  User nobody\n  ProxyCommand touch {marker}\n"
    (home / ".ssh" / "config").write_text(redirect)
    (home / ".fabric.yaml").write_text(f"load_ssh_configs: true\ngateway: touch {marker}\n")
    monkeypatch.setenv("HOME", str(home))
    result = run_ssh(server_config(sshd_server, command="echo direct"))
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output == "direct\n"
    assert not marker.exists()


def test_a_key_the_server_does_not_accept_is_an_authentication_error(sshd_server, tmp_path):
    key = new_key_file(tmp_path / "other_key")
    result = run_ssh(server_config(sshd_server, key=key, command="true"))
    assert result.status is Status.ERROR
    assert result.error == ssh.AUTH_FAILED.format(
        user=sshd_server.user, host=sshd_server.host, port=sshd_server.port, methods=f"key {key}"
    )


def test_a_wrong_password_is_an_error_that_never_shows_the_password(sshd_server):
    config = server_config(sshd_server, key=None, password="hunter2-not-it", command="true")
    result = run_ssh(config)
    assert result.status is Status.ERROR
    assert str(result.error).startswith(f"authentication failed for {sshd_server.user}@")
    assert "hunter2" not in f"{result.error} {result.output}"


def test_a_key_and_a_password_together_try_the_key_first(sshd_server):
    result = run_ssh(server_config(sshd_server, password="not-needed", command="echo ok"))
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output == "ok\n"


def test_an_encrypted_key_needs_its_passphrase(sshd_server, tmp_path):
    original = serialization.load_ssh_private_key(Path(sshd_server.client_key).read_bytes(), password=None)
    assert isinstance(original, Ed25519PrivateKey)
    key = new_key_file(tmp_path / "locked", password=b"open sesame", key=original)
    without = run_ssh(server_config(sshd_server, key=key, command="true"))
    assert without.error == ssh.KEY_ENCRYPTED.format(path=key)
    wrong = run_ssh(server_config(sshd_server, key=key, key_passphrase="nope", command="true"))
    assert wrong.error == ssh.KEY_UNREADABLE.format(path=key, reason="wrong key_passphrase, or not a private key")
    right = run_ssh(server_config(sshd_server, key=key, key_passphrase="open sesame", command="echo ok"))
    assert right.status is Status.SUCCEEDED, right.error


def test_a_missing_key_file_is_an_error(tmp_path):
    missing = tmp_path / "id_missing"
    result = run_ssh({"host": "127.0.0.1", "key": str(missing), "command": "true"})
    assert result.status is Status.ERROR
    assert result.error == ssh.KEY_MISSING.format(path=missing)


def test_a_public_key_given_as_key_is_an_error(sshd_server):
    public = sshd_server.client_key + ".pub"
    result = run_ssh(server_config(sshd_server, key=public, command="true"))
    assert result.error == ssh.KEY_UNREADABLE.format(path=public, reason="not an ed25519, ecdsa or rsa private key")


def test_a_refused_connection_is_an_error():
    port = free_port()
    result = run_ssh({"host": "127.0.0.1", "port": port, "command": "true", "known_hosts": "/dev/null"})
    assert result.status is Status.ERROR
    assert result.error == ssh.CONNECT_FAILED.format(host="127.0.0.1", port=port, reason="connection refused")


def test_a_server_that_never_answers_times_out_promptly():
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = run_ssh(
            {"host": "127.0.0.1", "port": port, "command": "true", "known_hosts": "/dev/null", "timeout": "1s"},
            timeout=None,
        )
        elapsed = time.monotonic() - started
    assert result.status is Status.TIMED_OUT
    assert elapsed < 2.5


@pytest.mark.parametrize(("task_timeout", "option_timeout"), [("2s", None), (None, "2s")])
def test_a_timeout_stops_the_remote_command_and_leaves_no_process(sshd_server, tmp_path, task_timeout, option_timeout):
    sleeper, marker = unique_sleep()
    started_file = tmp_path / "started"
    config = server_config(sshd_server, command=f"touch {started_file}; {sleeper}", timeout=option_timeout)
    started = time.monotonic()
    result = run_ssh(config, timeout=task_timeout)  # 2 s: time for a loaded machine to connect and start it
    assert result.status is Status.TIMED_OUT
    assert result.error == "timed out (its timeout)"
    assert time.monotonic() - started < 2 + 2 * ssh.REAP_WAIT + 1  # the sleep's 30 s were not waited for
    assert started_file.exists(), "the remote command never started"
    assert wait_for(lambda: not live_processes(marker), timeout=5), live_processes(marker)


def test_a_timed_out_remote_command_keeps_the_output_it_wrote(sshd_server):
    sleeper, marker = unique_sleep()
    result = run_ssh(server_config(sshd_server, command=f"echo begin; {sleeper}"), timeout="2s")
    assert result.status is Status.TIMED_OUT
    assert result.error == "timed out (its timeout)"
    assert result.output == "begin\n"
    assert wait_for(lambda: not live_processes(marker), timeout=5), live_processes(marker)


def test_a_cancel_from_another_thread_stops_the_remote_command(sshd_server):
    sleeper, marker = unique_sleep()
    cancel = threading.Event()
    box: dict[str, probe.TaskResult] = {}
    wf = probe.load_workflow(workflow_text(server_config(sshd_server, command=sleeper)))
    runner = threading.Thread(target=lambda: box.update(r=probe.run_workflow(wf, cancel=cancel).tasks[0]))
    runner.start()
    try:
        assert wait_for(lambda: bool(live_processes(marker))), "the remote sleep never started"
    finally:
        cancel.set()
        cancelled_at = time.monotonic()
        runner.join(10)
    assert time.monotonic() - cancelled_at < 2
    assert box["r"].status is Status.CANCELLED
    assert box["r"].error == "cancelled"
    assert wait_for(lambda: not live_processes(marker), timeout=1.0)


def test_an_abort_makes_run_raise_task_stopped(sshd_server):
    command, marker = unique_sleep()
    ctx = probe.TaskContext(task="t", deadline=time.monotonic() + 20, output_limit=65536)
    config = {"port": 22, "insecure_ignore_host_key": False, **server_config(sshd_server, command=command)}
    threading.Timer(0.5, ctx.abort, args=("cancelled",)).start()
    started = time.monotonic()
    with pytest.raises(probe.TaskStopped):
        ssh.SSHTask().run(config, ctx)
    assert time.monotonic() - started < 2
    assert wait_for(lambda: not live_processes(marker), timeout=1.0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"host": "h"}, ssh.NOTHING_TO_DO),
        ({"host": "h", "command": "  "}, ssh.EMPTY_COMMAND),
        ({"host": "h", "upload": {"local": "a"}}, ssh.UPLOAD_SHAPE),
        ({"host": "h", "upload": {"local": "a", "remote": "b", "mode": "0755"}}, ssh.UPLOAD_SHAPE),
        ({"host": "h", "command": "true", "key_passphrase": "x"}, ssh.PHRASE_WITHOUT_KEY),
        ({"host": "h", "command": "true", "port": 70000}, ssh.BAD_PORT.format(port=70000)),
        ({"host": "h", "command": "true", "env": {"BAD-NAME": "1"}}, ssh.BAD_ENV_NAME.format(name="BAD-NAME")),
    ],
)
def test_option_combinations_are_checked_when_the_workflow_loads(config, message):
    assert message in load_problems(config)


def test_the_remote_command_line_quotes_env_and_workdir():
    line = ssh.remote_command("make", {"A": "x y", "B": "it's"}, "/srv/my app")
    assert line == "export A='x y' B='it'\"'\"'s'\ncd '/srv/my app' || exit\nmake"
    assert ssh.remote_command("ls", None, "~/app dir") == "cd ~/'app dir' || exit\nls"
