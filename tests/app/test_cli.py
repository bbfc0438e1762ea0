"""The ``automation`` command: tenants, projects and tokens for set-up."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jwt
import pytest

from app.auth.tokens import CANNOT_ISSUE, NOT_TEXT
from app.cli import main
from tests.app.support import SECRET


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("JWT_SECRET", SECRET)
    assert main(["db", "upgrade"]) == 0
    return url


def test_a_tenant_a_project_and_a_token_are_made_from_the_command_line(
    environment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tenant", "create", "acme", "--name", "ACME"]) == 0
    assert main(["project", "create", "web", "--tenant", "acme"]) == 0
    capsys.readouterr()
    assert main(["token", "create", "--tenant", "acme", "--project", "web", "--role", "operator", "--ttl", "2h"]) == 0
    claims = jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])
    assert claims["tenant_id"] == "acme" and claims["project_id"] == "web" and claims["role"] == "operator"
    assert claims["exp"] - claims["iat"] == 7200


def test_an_agent_token_names_its_agent(environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    main(["tenant", "create", "acme"])
    main(["project", "create", "web", "--tenant", "acme"])
    capsys.readouterr()
    assert main(["token", "create", "--tenant", "acme", "--project", "web", "--role", "agent", "--agent-id", "a1"]) == 0
    assert jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])["agent_id"] == "a1"
    assert main(["token", "create", "--tenant", "acme", "--role", "agent"]) == 1
    assert "agent id" in capsys.readouterr().err


def test_the_command_line_refuses_unknown_tenants_and_duplicates(
    environment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "create", "--tenant", "nope", "--role", "viewer"]) == 1
    assert "does not exist" in capsys.readouterr().err
    main(["tenant", "create", "acme"])
    assert main(["tenant", "create", "acme"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["project", "create", "web", "--tenant", "nope"]) == 1
    assert main(["token", "create", "--tenant", "acme", "--role", "viewer", "--ttl", "soon"]) == 1


@pytest.mark.parametrize(
    "made",
    [["tenant", "create", "ACME"], ["tenant", "create", "acme "], ["project", "create", "Web", "--tenant", "acme"]],
)
def test_the_command_line_makes_no_tenant_or_project_whose_id_no_token_could_name(
    environment: str, capsys: pytest.CaptureFixture[str], made: list[str]
) -> None:
    main(["tenant", "create", "acme"])
    capsys.readouterr()
    assert main(made) == 1
    assert "is not an id: lower-case letters" in capsys.readouterr().err
    assert main(["tenant", "create", "acme-2"]) == 0 and main(["project", "create", "web_1", "--tenant", "acme"]) == 0


@pytest.mark.parametrize(
    ("option", "claim"),
    [("--subject", "sub"), ("--tenant", "tenant_id"), ("--project", "project_id"), ("--agent-id", "agent_id")],
)
def test_a_token_is_not_issued_for_bytes_of_the_command_line_that_are_not_utf8(
    option: str, claim: str, environment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["tenant", "create", "acme"])
    main(["project", "create", "web", "--tenant", "acme"])
    capsys.readouterr()
    given = {"--tenant": "acme", "--project": "web", "--agent-id": "a1", option: os.fsdecode(b"op\xff")}
    assert main(["token", "create", "--role", "agent", *(part for pair in given.items() for part in pair)]) == 1
    captured = capsys.readouterr()
    assert not captured.out
    assert captured.err == f"automation: {CANNOT_ISSUE.format(reason=NOT_TEXT.format(name=repr(claim)))}\n"


def test_a_token_is_not_issued_for_a_subject_longer_than_the_audit_log_keeps(
    environment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["tenant", "create", "acme"])
    capsys.readouterr()
    assert main(["token", "create", "--tenant", "acme", "--role", "viewer", "--subject", "o" * 256]) == 1
    assert "claim 'sub' is longer than 255 characters" in capsys.readouterr().err


def test_without_a_command_the_help_is_shown() -> None:
    assert main([]) == 2


@pytest.mark.parametrize("login", [None, "", "ops", "ops:", ":secret", "ops:secret,viewer"])
def test_flower_does_not_start_without_a_login(
    login: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "execve", lambda *args: pytest.fail(f"Flower was started: {args[1]}"))
    if login is None:
        monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)
    else:
        monkeypatch.setenv("FLOWER_BASIC_AUTH", login)
    assert main(["flower"]) == 1
    assert "set FLOWER_BASIC_AUTH to user:password" in capsys.readouterr().err


def test_flower_gets_its_login_from_the_environment_never_its_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.append((path, argv, env)))
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:s3cret,viewer:other")
    monkeypatch.delenv("FLOWER_ADDRESS", raising=False)
    monkeypatch.setenv("FLOWER_PORT", "")  # empty is unset, as the Procfile's ${FLOWER_PORT:-5555} had it
    main(["flower"])
    [(path, argv, env)] = started
    assert argv[1:] == ["-A", "app.celery_app:celery", "flower"] and not any("s3cret" in arg for arg in argv)
    assert env["FLOWER_BASIC_AUTH"] == "ops:s3cret,viewer:other"
    assert (env["FLOWER_ADDRESS"], env["FLOWER_PORT"]) == ("127.0.0.1", "5555")  # never every interface
    assert path == str(Path(sys.executable).parent / "celery")  # this environment's Celery, whatever PATH says
