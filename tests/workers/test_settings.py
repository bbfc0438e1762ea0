"""The agent's settings from its environment: required variables, numbers and switches."""

from __future__ import annotations

import pytest

from dispatch.contract import agent_acl
from workers.settings import SettingsError, load_settings

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


@pytest.mark.parametrize(("raw", "isolated"), [(None, False), ("", False), ("off", False), ("TRUE", True), ("1", True)])
def test_broker_isolation_is_a_switch(raw: str | None, isolated: bool) -> None:
    env = BASE if raw is None else {**BASE, "AGENT_BROKER_ISOLATION": raw}
    assert load_settings(env).isolated is isolated


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
