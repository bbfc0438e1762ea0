"""Project secrets: set and deleted by the tenant's admins, sealed at rest, never shown again, and handed only to
the agent that claims a job whose workflow names them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, text

from app.config import ConfigError, new_secrets_key
from app.extensions import db
from app.jobs import dispatching
from app.jobs.models import Job
from app.secretstore import service
from app.secretstore.models import ProjectSecret
from tests.app.support import SECRET, SECRETS_KEY, Api, Tenant, token

VALUE = "s3cr3t-p4ss'w\"rd"
USES = (
    "name: uses-secrets\ntasks:\n  - name: q\n    type: command\n    config:\n"
    '      command: echo\n      args: ["{{.secrets.DB_PW}}", "{{ .secrets.MISSING }}"]\n'
)
PATH = "/api/v1/tenants/acme/projects/web/secrets"


def test_an_admin_sets_replaces_lists_and_deletes_a_secret_whose_value_never_comes_back(
    api: Api, world: dict[str, Tenant]
) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    created = api.put(f"{PATH}/DB_PW", admin, json={"value": "first"})
    assert created.status_code == 201, created.json
    assert created.json["name"] == "DB_PW" and created.json["updated_by"] == "tenant_admin@acme"
    replaced = api.put(f"{PATH}/DB_PW", admin, json={"value": VALUE})
    assert replaced.status_code == 200 and replaced.json["created_at"] == created.json["created_at"]
    listed = api.get(PATH, admin)
    assert [s["name"] for s in listed.json["secrets"]] == ["DB_PW"]
    assert "first" not in json.dumps([created.json, replaced.json, listed.json]) and VALUE not in listed.get_data(True)
    assert api.delete(f"{PATH}/DB_PW", admin).status_code == 204
    assert api.delete(f"{PATH}/DB_PW", admin).json["error"] == "not_found"
    audited = api.get("/api/v1/audit?tenant_id=acme", admin).json["events"]
    assert [e["action"] for e in audited if e["target_type"] == "secret"] == [
        "secret.deleted",
        "secret.set",
        "secret.set",
    ]
    assert VALUE not in json.dumps(audited) and "first" not in json.dumps(audited)


def test_only_the_tenants_admins_reach_a_projects_secrets(api: Api, world: dict[str, Tenant]) -> None:
    acme, globex = world["acme"], world["globex"]
    assert api.put(f"{PATH}/K", acme.tokens["operator"], json={"value": "v"}).status_code == 403
    assert api.get(PATH, acme.tokens["agent"]).status_code == 403
    assert api.put(f"{PATH}/K", globex.tokens["tenant_admin"], json={"value": "v"}).status_code == 404
    other_project = token("acme", "tenant_admin", project_override="db")
    assert api.put(f"{PATH}/K", other_project, json={"value": "v"}).status_code == 404
    refused = api.put(f"{PATH}/not%20a%20name", acme.tokens["tenant_admin"], json={"value": "v"})
    assert refused.status_code == 400 and "a secret's name" in refused.json["message"]
    assert api.put(f"{PATH}/K", acme.tokens["tenant_admin"], json={"value": ""}).status_code == 400
    assert api.put(f"{PATH}/K", acme.tokens["tenant_admin"], json={"value": 5}).status_code == 400
    missing = api.put("/api/v1/tenants/acme/projects/nope/secrets/K", acme.tokens["tenant_admin"], json={"value": "v"})
    assert missing.status_code == 404


def test_a_value_is_sealed_at_rest_and_opens_only_in_its_own_project(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    assert api.put(f"{PATH}/DB_PW", admin, json={"value": VALUE}).status_code == 201
    assert api.put("/api/v1/tenants/acme/projects/db/secrets/DB_PW", admin, json={"value": "db's"}).status_code == 201
    with app.app_context():
        web, other = (db.session.get(ProjectSecret, ("acme", p, "DB_PW")) for p in ("web", "db"))
        assert web is not None and other is not None
        assert VALUE not in web.sealed and "s3cr3t" not in web.sealed
        assert service.for_workflow("acme", "web", USES) == {"DB_PW": VALUE}
        other.sealed = web.sealed  # web's sealed value copied into project db's row
        db.session.commit()
        assert service.for_workflow("acme", "db", USES) == {}  # bound to acme/web/DB_PW: it does not open


def test_a_claim_hands_over_the_secrets_the_workflow_names_and_nothing_else_shows_them(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    for name, value in (("DB_PW", VALUE), ("UNUSED", "not-named"), ("MISSING", "deleted before the claim")):
        assert api.put(f"{PATH}/{name}", acme.tokens["tenant_admin"], json={"value": value}).status_code == 201
    with_secrets = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": USES}).json["job_id"]
    assert api.delete(f"{PATH}/MISSING", acme.tokens["tenant_admin"]).status_code == 204
    plain = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": USES.replace(".secrets.", ".")}).json[
        "job_id"
    ]
    claims = {}
    for job_id in (with_secrets, plain):
        with app.app_context():
            job = db.session.get(Job, job_id)
            assert job is not None
            dispatching.open_next_attempt(job, actor="test")
        claims[job_id] = api.post(f"/api/v1/jobs/{job_id}/claim", acme.tokens["agent"], json={"attempt": 1}).json
    assert claims[with_secrets]["secrets"] == {"DB_PW": VALUE}  # MISSING has no value, UNUSED is not named
    assert claims[plain]["secrets"] == {}
    shown = api.get(f"/api/v1/jobs/{with_secrets}", acme.tokens["operator"]).get_data(as_text=True)
    assert VALUE not in shown and "{{.secrets.DB_PW}}" in json.loads(shown)["workflow"]
    with app.app_context():
        stored = json.dumps([list(map(str, row)) for row in db.session.execute(select(Job.workflow, Job.variables))])
    assert VALUE not in stored


def test_a_malformed_secrets_key_stops_the_app_at_start(make_app: Any) -> None:
    for bad in ("short", base64.b64encode(b"x" * 31).decode(), "not base64!"):
        with pytest.raises(ConfigError, match="SECRETS_KEY must be the base64 form of 32 random bytes"):
            make_app(SECRETS_KEY=bad)


def test_a_secret_sealed_under_another_key_is_left_out_of_the_claim_and_logged(
    api: Api, make_app: Any, world: dict[str, Tenant], caplog: pytest.LogCaptureFixture
) -> None:
    assert api.put(f"{PATH}/DB_PW", world["acme"].tokens["tenant_admin"], json={"value": VALUE}).status_code == 201
    rekeyed = make_app(SECRETS_KEY=new_secrets_key())
    with rekeyed.app_context(), caplog.at_level("ERROR", logger="app.secretstore.service"):
        assert service.for_workflow("acme", "web", USES) == {}
    assert "does not open with SECRETS_KEY" in caplog.text and VALUE not in caplog.text


def test_without_secrets_key_the_instance_folder_keeps_one_or_secrets_are_unavailable(
    make_app: Any, world: dict[str, Tenant], tmp_path: Path
) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    keeper = make_app(SECRETS_KEY=None)
    keeper.instance_path = str(tmp_path / "instance")
    assert Api(keeper.test_client()).put(f"{PATH}/A", admin, json={"value": VALUE}).status_code == 201
    key_file = tmp_path / "instance" / "secrets-key"
    assert key_file.stat().st_mode & 0o777 == 0o600 and len(base64.b64decode(key_file.read_text())) == 32
    (tmp_path / "not-a-folder").write_text("")
    keeper.instance_path = str(tmp_path / "not-a-folder" / "instance")  # cannot be made: a read-only deployment
    refused = Api(keeper.test_client()).put(f"{PATH}/B", admin, json={"value": VALUE})
    assert refused.status_code == 503 and refused.json["error"] == "secrets_not_configured", refused.json


def test_automation_keys_secrets_key_prints_a_key_the_app_takes(make_app: Any) -> None:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("automation")), "keys", "secrets-key"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    line = done.stdout.strip()
    assert line.startswith("SECRETS_KEY=")
    key = line.split("=", 1)[1].split()[0]
    assert len(base64.b64decode(key)) == 32
    make_app(SECRETS_KEY=key)  # no ConfigError


def test_names_are_compared_as_written_and_values_may_fill_64_kib(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    assert api.put(f"{PATH}/DB_PW", admin, json={"value": "upper"}).status_code == 201
    assert api.put(f"{PATH}/db_pw", admin, json={"value": "lower"}).status_code == 201  # another secret
    assert [s["name"] for s in api.get(PATH, admin).json["secrets"]] == ["DB_PW", "db_pw"]
    biggest = "x" * 65536
    assert api.put(f"{PATH}/BIG", admin, json={"value": biggest}).status_code == 201
    for too_big in ("x" * 65537, "é" * 32769):  # bytes of UTF-8 are counted, not characters
        refused = api.put(f"{PATH}/BIG", admin, json={"value": too_big})
        assert refused.status_code == 400 and "at most 65536 bytes" in refused.json["message"], refused.json
    lower = USES.replace("DB_PW", "db_pw").replace("MISSING", "BIG")
    with app.app_context():
        assert service.for_workflow("acme", "web", lower) == {"db_pw": "lower", "BIG": biggest}


def test_a_job_naming_a_secret_its_project_lacks_is_refused_at_submission(api: Api, world: dict[str, Tenant]) -> None:
    acme = world["acme"]
    assert api.put(f"{PATH}/DB_PW", acme.tokens["tenant_admin"], json={"value": VALUE}).status_code == 201
    before = api.get("/api/v1/jobs", acme.tokens["operator"]).json["total"]
    refused = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": USES})
    assert refused.status_code == 422 and refused.json["error"] == "unknown_secret", refused.json
    assert refused.json["names"] == ["MISSING"] and "project 'web'" in refused.json["message"]
    batch = api.post("/api/v1/jobs/batch", acme.tokens["operator"], json={"jobs": [{"workflow": USES}]})
    assert batch.status_code == 422 and batch.json["index"] == 0 and batch.json["names"] == ["MISSING"]
    assert api.get("/api/v1/jobs", acme.tokens["operator"]).json["total"] == before  # nothing was stored
    named_one = USES.replace(', "{{ .secrets.MISSING }}"', "")
    assert api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": named_one}).status_code == 201


def test_after_a_change_of_key_the_secrets_are_resealed_from_the_command_line(
    api: Api, make_app: Any, world: dict[str, Tenant], database_url: str
) -> None:
    admin = world["acme"].tokens["tenant_admin"]
    assert api.put(f"{PATH}/DB_PW", admin, json={"value": VALUE}).status_code == 201
    new_key = new_secrets_key()
    env = {**os.environ, "DATABASE_URL": database_url, "JWT_SECRET": SECRET, "SECRETS_KEY": new_key}
    command = [str(Path(sys.executable).with_name("automation")), "keys", "reseal-secrets"]

    def reseal(old: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "--old-key-from-env", "OLD"], env={**env, "OLD": old}, capture_output=True, text=True, timeout=60
        )

    rekeyed = make_app(SECRETS_KEY=new_key)
    with rekeyed.app_context():
        assert service.for_workflow("acme", "web", USES) == {}  # sealed under the old key
    done = reseal(SECRETS_KEY)
    assert done.returncode == 0 and "resealed 1 secret(s) under SECRETS_KEY; 0 already were" in done.stdout, done
    with rekeyed.app_context():
        assert service.for_workflow("acme", "web", USES) == {"DB_PW": VALUE}
    again = reseal(SECRETS_KEY)
    assert again.returncode == 0 and "resealed 0 secret(s) under SECRETS_KEY; 1 already were" in again.stdout
    stranger = make_app(SECRETS_KEY=new_secrets_key())  # a key that opens nothing stored
    with stranger.app_context():
        assert service.reseal(SECRETS_KEY) == (0, 0, ["acme/web/DB_PW"])
    assert reseal("not a key").returncode == 1


def test_a_claim_whose_secrets_cannot_be_read_is_rolled_back_and_can_be_made_again(
    api: Api, app: Flask, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    assert api.put(f"{PATH}/DB_PW", acme.tokens["tenant_admin"], json={"value": VALUE}).status_code == 201
    workflow = USES.replace('"{{ .secrets.MISSING }}"', '"x"')
    job_id = api.post("/api/v1/jobs", acme.tokens["operator"], json={"workflow": workflow}).json["job_id"]
    with app.app_context():
        job = db.session.get(Job, job_id)
        assert job is not None
        dispatching.open_next_attempt(job, actor="test")
        # the database fails the secrets' read (a real error of the real database: the table is away)
        db.session.execute(text("ALTER TABLE project_secrets RENAME TO project_secrets_away"))
        db.session.commit()
    failed = api.post(f"/api/v1/jobs/{job_id}/claim", acme.tokens["agent"], json={"attempt": 1})
    assert failed.status_code in (500, 503)  # a missing table: an OperationalError on SQLite, not on MariaDB
    with app.app_context():
        db.session.execute(text("ALTER TABLE project_secrets_away RENAME TO project_secrets"))
        db.session.commit()
    assert api.get(f"/api/v1/jobs/{job_id}", acme.tokens["operator"]).json["state"] == "queued"  # nothing kept
    again = api.post(f"/api/v1/jobs/{job_id}/claim", acme.tokens["agent"], json={"attempt": 1})  # the agent's retry
    assert again.status_code == 200, again.json
    assert again.json["state"] == "running" and again.json["secrets"] == {"DB_PW": VALUE}
