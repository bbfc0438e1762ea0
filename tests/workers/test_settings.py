"""The agent's settings from its environment: required variables, numbers and switches; its credentials kept out of
the environment it was started with."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dispatch.contract import agent_acl
from workers.settings import CREDENTIALS, SettingsError, hide_credentials, load_settings

BASE = {
    "CONTROL_PLANE_URL": "https://cp.example",
    "TENANT_ID": "acme",
    "PROJECT_ID": "web",
    "AGENT_ID": "a1",
    "JWT_TOKEN": "t",
    "VALKEY_URL": "redis://valkey:6379/0",
    "JOB_VERIFY_KEY": "k",
}


def test_a_missing_variable_is_named() -> None:
    with pytest.raises(SettingsError, match="JWT_TOKEN"):
        load_settings({k: v for k, v in BASE.items() if k != "JWT_TOKEN"})


def test_a_token_read_from_a_file_loses_its_line_end_and_a_broken_one_is_refused_unseen() -> None:
    assert load_settings({**BASE, "JWT_TOKEN": "eyJh.eyJz.c2ln\r\n"}).jwt_token == "eyJh.eyJz.c2ln"
    for broken in ("eyJh.eyJz.c2ln\nsecond-line", "Bearer eyJh.eyJz.c2ln", "eyJh\x00.c2ln"):
        with pytest.raises(SettingsError) as refused:
            load_settings({**BASE, "JWT_TOKEN": broken})
        assert "eyJ" not in str(refused.value) and "JWT_TOKEN" in str(refused.value)


@pytest.mark.parametrize(("raw", "isolated"), [(None, False), ("", False), ("off", False), ("TRUE", True), ("1", True)])
def test_broker_isolation_is_a_switch(raw: str | None, isolated: bool) -> None:
    env = BASE if raw is None else {**BASE, "AGENT_BROKER_ISOLATION": raw}
    assert load_settings(env).isolated is isolated


@pytest.mark.parametrize(("raw", "level"), [(None, "INFO"), ("", "INFO"), (" debug ", "DEBUG")])
def test_an_empty_log_level_means_the_default(raw: str | None, level: str) -> None:
    env = BASE if raw is None else {**BASE, "LOG_LEVEL": raw}
    assert load_settings(env).log_level == level


def test_a_malformed_switch_is_refused() -> None:
    with pytest.raises(SettingsError, match="AGENT_BROKER_ISOLATION must be true or false"):
        load_settings({**BASE, "AGENT_BROKER_ISOLATION": "maybe"})


def test_the_acl_of_an_agent_names_only_its_own_queues_keys_and_channels() -> None:
    rules = agent_acl("acme", "web", "a1", "linux", "pw", db=2)
    assert rules[:7] == ["agent-acme-a1", "reset", "on", ">pw", "resetkeys", "resetchannels", "-@all"]
    keys = {rule[1:] for rule in rules if rule.startswith("~")}
    assert {"agent.acme.a1", "agent.acme.a1:*", "agent.acme.a1.*", "tenant.acme.web.linux"} <= keys
    assert not [key for key in keys if key.startswith(("agent.acme.a1*", "tenant.acme.*", "*", "unacked"))]
    assert {rule for rule in rules if rule.startswith("&")} == {"&automation.control.acme.a1", "&/2.ev.acme/*"}
    assert "+keys" not in rules and "+scan" not in rules and "+flushall" not in rules
    with pytest.raises(ValueError, match="agent id"):
        agent_acl("acme", "web", "a1 ~*", "linux", "pw")


# What a process shows of itself after hide_credentials: the environment it was started with (what /proc and `ps e`
# show every process of its user), what it holds in os.environ, its pid, and its open memory files.
SHOW_SELF = """
import json, os, sys
from workers.settings import hide_credentials
hide_credentials()
fds = [os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{n}")]
print(json.dumps({
    "started_with": open("/proc/self/environ", "rb").read().decode(),
    "environ": dict(os.environ),
    "pid": os.getpid(),
    "name": open("/proc/self/comm").read().strip(),
    "memfds": [target for target in fds if target.startswith("/memfd:")],
}))
"""


def _show_self(directory: Path, **env: str) -> dict[str, Any]:
    """Run SHOW_SELF as a script named agent-probe (its process's name, as ``automation`` is the agent's); what it
    printed, and the pid it was started with."""
    script = directory / "agent-probe"
    script.write_text(f"#!{sys.executable}\n{SHOW_SELF}")
    script.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIALS and k != "AGENT_CREDENTIALS_FD"}
    with subprocess.Popen([str(script)], env={**base, **env}, stdout=subprocess.PIPE, text=True) as process:
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    shown: dict[str, Any] = json.loads(out)
    shown["started_as"] = process.pid
    return shown


def test_the_agents_credentials_are_not_in_the_environment_it_was_started_with(tmp_path: Path) -> None:
    secrets = {"JWT_TOKEN": "secret-token", "VALKEY_URL": "redis://:pw@valkey:6379/0", "JOB_VERIFY_KEY": "key"}
    shown = _show_self(tmp_path, **secrets, AGENT_SCRUB_ENV="CLOUD_KEY", CLOUD_KEY="cloud-secret", TENANT_ID="acme")
    for name, value in [*secrets.items(), ("CLOUD_KEY", "cloud-secret")]:
        assert value not in shown["started_with"] and name not in shown["started_with"], name
        assert shown["environ"][name] == value  # for load_settings, until scrub_environment removes it
    assert "TENANT_ID=acme" in shown["started_with"] and shown["environ"]["TENANT_ID"] == "acme"
    assert "AGENT_CREDENTIALS_FD" not in shown["environ"] and shown["memfds"] == []  # read, then closed
    assert "AGENT_CREDENTIALS_FD=" in shown["started_with"]  # so it was started again: the same process, by pid
    assert shown["pid"] == shown["started_as"] and shown["name"] == "agent-probe"  # and keeps its name


def test_an_agent_started_without_credentials_is_not_started_again(tmp_path: Path) -> None:
    shown = _show_self(tmp_path, TENANT_ID="acme")
    assert "AGENT_CREDENTIALS_FD" not in shown["started_with"] and "TENANT_ID=acme" in shown["started_with"]


def test_a_handover_that_cannot_be_read_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGENT_CREDENTIALS_FD", "three")
    with pytest.raises(SettingsError, match="AGENT_CREDENTIALS_FD must be a file descriptor"):
        hide_credentials()
    not_json = tmp_path / "handover"
    not_json.write_text("JWT_TOKEN=t")
    monkeypatch.setenv("AGENT_CREDENTIALS_FD", str(os.open(not_json, os.O_RDONLY)))
    with pytest.raises(SettingsError, match="cannot read the credentials handed over"):
        hide_credentials()
    monkeypatch.setenv("AGENT_CREDENTIALS_FD", str(os.open(not_json, os.O_RDONLY)))
    not_json.write_text('["JWT_TOKEN"]')
    with pytest.raises(SettingsError, match="not a map of strings"):
        hide_credentials()
    assert "JWT_TOKEN" not in os.environ


# An agent (after hide_credentials) that runs a workflow's command as its own user: the command tries to read the
# agent's memory, where its credentials live on, as any process of the same user could without a ptrace guard.
READ_PARENT = """
import subprocess, sys
from workers.settings import hide_credentials
hide_credentials()
peek = "import os; f = open(f'/proc/{os.getppid()}/mem', 'rb'); print('read')"
done = subprocess.run([sys.executable, "-c", peek], capture_output=True, text=True)
print(done.stdout.strip() or done.stderr.strip().splitlines()[-1])
"""


def _without_ptrace_capability() -> None:
    """(In the child, before exec.) Drop CAP_SYS_PTRACE from the bounding set: root then reads another process's
    memory only as any user does, by the same rules (the agent's user and its dumpable flag)."""
    ctypes.CDLL(None).prctl(24, 19, 0, 0, 0)  # PR_CAPBSET_DROP, CAP_SYS_PTRACE


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl's PR_SET_DUMPABLE is Linux's")
@pytest.mark.parametrize("credentials", [{"JWT_TOKEN": "secret-token"}, {}])
def test_a_workflow_running_as_the_agents_user_cannot_read_the_agents_memory(credentials: dict[str, str]) -> None:
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIALS and k != "AGENT_CREDENTIALS_FD"}
    env = {**base, **credentials, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", READ_PARENT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_without_ptrace_capability if os.geteuid() == 0 else None,  # pytest runs no threads here
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("PermissionError"), done.stdout
