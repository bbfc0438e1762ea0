"""Job logs with QUICKWIT_URL set: committed lines forwarded as NDJSON, searches sent to Quickwit for one tenant.

Quickwit cannot be installed here: these tests run against the loopback stand-in of tests/servers/quickwit.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from prometheus_client import Metric
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.extensions import db
from app.jobs.models import Job
from app.logs.models import JobLogLine
from app.logs.service import SINK, append_lines, document
from dispatch.logsink import DROPPED, LogSink
from tests.app.support import Api, MakeApp, Tenant, token
from tests.servers.quickwit import REQUIRED, QuickwitStandIn


def line(message: str, *, task: str | None = "disk", level: str = "info", ts: str = "2026-11-28T10:00:00Z") -> dict:
    return {"ts": ts, "task": task, "level": level, "message": message}


def counted(metric: Any, **labels: str) -> float:
    """The value of a counter (``_total`` sample) with these labels."""
    families: list[Metric] = list(metric.collect())
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture
def qw_app(make_app: MakeApp, quickwit_server: QuickwitStandIn) -> Iterator[Flask]:
    """The control plane with QUICKWIT_URL pointing at the stand-in."""
    made = make_app(QUICKWIT_URL=quickwit_server.url)
    yield made
    made.extensions[SINK].close()


@pytest.fixture
def qw(qw_app: Flask) -> Api:
    return Api(qw_app.test_client())


def ship(api: Api, tenant: Tenant, job_id: str, lines: list[dict]) -> Any:
    response = api.post(f"/api/v1/jobs/{job_id}/logs", tenant.tokens["agent"], json={"attempt": 1, "lines": lines})
    assert response.status_code == 200, response.json
    return response


def forwarded(app: Flask) -> None:
    assert app.extensions[SINK].flush(30), "the forwarder did not empty its queue"


def test_committed_lines_reach_quickwit_as_ndjson_documents(
    qw: Api, qw_app: Flask, quickwit_server: QuickwitStandIn, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    ship(qw, acme, acme.running, [line("one"), line("two", level="error", task=None)])
    forwarded(qw_app)
    body = b"".join(quickwit_server.ingests)
    assert body.endswith(b"\n") and len(body.splitlines()) == 2
    first, second = (json.loads(raw) for raw in body.splitlines())
    assert first == {
        "timestamp": "2026-11-28T10:00:00Z",
        "tenant_id": "acme",
        "project_id": "web",
        "job_id": acme.running,
        "attempt": 1,
        "seq": 1,
        "task": "disk",
        "level": "info",
        "message": "one",
    }
    assert (second["seq"], second["level"], second["task"]) == (2, "error", None)
    assert len(quickwit_server.documents) == 2  # the stand-in found every required field


def test_lines_of_a_rolled_back_transaction_are_not_forwarded(
    qw_app: Flask, quickwit_server: QuickwitStandIn, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    with qw_app.test_request_context():
        job = db.session.get(Job, acme.running)
        assert job is not None
        append_lines(job, 1, [line("rolled back")])
        db.session.rollback()
        job = db.session.get(Job, acme.running)
        assert job is not None
        append_lines(job, 1, [line("committed")])
        db.session.commit()
    forwarded(qw_app)
    assert [d["message"] for d in quickwit_server.documents] == ["committed"]


def test_search_goes_to_quickwit_with_the_tenant_anded_to_the_parenthesised_query(
    qw: Api, qw_app: Flask, quickwit_server: QuickwitStandIn, world: dict[str, Tenant]
) -> None:
    acme, globex = world["acme"], world["globex"]
    ship(qw, acme, acme.running, [line("disk full on /var", level="error"), line("all good", task="uptime")])
    ship(qw, globex, globex.running, [line("disk full on /srv", level="error"), line("globex only")])
    forwarded(qw_app)
    viewer = acme.tokens["viewer"]
    found = qw.get("/api/v1/logs", viewer, query_string={"query": "disk"}).json
    assert found["backend"] == "quickwit" and found["total"] == 1
    assert [(h["message"], h["job_id"], h["seq"], h["ts"]) for h in found["lines"]] == [
        ("disk full on /var", acme.running, 1, "2026-11-28T10:00:00Z")
    ]
    assert quickwit_server.searches[-1]["query"] == "tenant_id:acme AND project_id:web AND (disk)"
    for crafted in ("tenant_id:globex OR disk", "globex OR disk", "* OR tenant_id:globex", "NOT tenant_id:acme"):
        result = qw.get("/api/v1/logs", viewer, query_string={"query": crafted}).json
        assert all(h["job_id"] == acme.running for h in result["lines"]), crafted
        assert result["total"] == len(result["lines"]), crafted  # Quickwit itself counted no other tenant's line
    assert qw.get("/api/v1/logs", viewer, query_string={"query": "globex"}).json["total"] == 0
    assert qw.get("/api/v1/logs", globex.tokens["viewer"]).json["total"] == 2


def test_quickwit_search_filters_become_escaped_terms_and_times_seconds(
    qw: Api, qw_app: Flask, quickwit_server: QuickwitStandIn, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    ship(
        qw,
        acme,
        acme.running,
        [
            line("at 91%", task="check disk", level="warning", ts="2026-11-28T10:00:01Z"),
            line("at 99%", task="check disk", level="error", ts="2026-11-28T10:00:02Z"),
            line("up", task="uptime", ts="2026-11-28T10:00:03Z"),
        ],
    )
    forwarded(qw_app)
    params = {"task": "check disk", "level": "error", "job_id": acme.running, "since": "2026-11-28T10:00:01.5Z"}
    found = qw.get("/api/v1/logs", acme.tokens["viewer"], query_string=params).json
    assert [h["message"] for h in found["lines"]] == ["at 99%"]
    sent = quickwit_server.searches[-1]
    assert (
        sent["query"]
        == f"tenant_id:acme AND project_id:web AND job_id:{acme.running} AND task:check\\ disk AND level:error"
    )
    start = datetime(2026, 11, 28, 10, 0, 1, tzinfo=UTC).timestamp()
    assert sent["start_timestamp"] == str(int(start)) and sent["sort_by"] == "timestamp"  # rounded down to seconds
    newest_first = qw.get("/api/v1/logs", acme.tokens["viewer"], query_string={"limit": "2"}).json
    assert newest_first["total"] == 3 and [h["message"] for h in newest_first["lines"]] == ["up", "at 99%"]
    qw.get("/api/v1/logs", acme.tokens["tenant_admin"])  # a token for the whole tenant: no project filter
    assert quickwit_server.searches[-1]["query"] == "tenant_id:acme"
    qw.get("/api/v1/logs", token("acme", "viewer", project="db"))
    assert quickwit_server.searches[-1]["query"] == "tenant_id:acme AND project_id:db"


@pytest.mark.parametrize(
    "query",
    ["x) OR (tenant_id:globex", "(x", 'x"', "x\\", "[a TO b) OR tenant_id:globex OR (c]", "a\nb"],
)
def test_a_query_that_could_escape_its_parentheses_is_refused_before_quickwit_sees_it(
    qw: Api, quickwit_server: QuickwitStandIn, world: dict[str, Tenant], query: str
) -> None:
    response = qw.get("/api/v1/logs", world["acme"].tokens["viewer"], query_string={"query": query})
    assert response.status_code == 400 and response.json["error"] == "invalid_query"
    assert quickwit_server.searches == []


@pytest.mark.parametrize("task", ["x\tOR\tpassword", "x\nOR password", "x\u2003OR\u2003password", "x\x00"])
def test_a_filter_that_could_end_its_term_is_refused_before_quickwit_sees_it(
    qw: Api, quickwit_server: QuickwitStandIn, world: dict[str, Tenant], task: str
) -> None:
    # a tab or line break would end the task term: tenant_id:acme AND task:x OR password searches every tenant
    response = qw.get("/api/v1/logs", world["acme"].tokens["viewer"], query_string={"task": task})
    assert response.status_code == 400 and response.json["error"] == "invalid_query", response.json
    assert quickwit_server.searches == []


def test_quickwit_refusals_and_outages_are_json_errors(
    qw: Api, quickwit_server: QuickwitStandIn, world: dict[str, Tenant]
) -> None:
    viewer = world["acme"].tokens["viewer"]
    response = qw.get("/api/v1/logs", viewer, query_string={"query": "disk~2"})  # the stand-in refuses '~'
    assert response.status_code == 400 and response.json["error"] == "invalid_query"
    assert "Quickwit refused" in response.json["message"]
    quickwit_server.search_status = 503
    response = qw.get("/api/v1/logs", viewer)
    assert response.status_code == 503 and response.json["error"] == "search_unavailable"
    quickwit_server.stop()
    response = qw.get("/api/v1/logs", viewer)
    assert response.status_code == 503 and response.json["error"] == "search_unavailable"


def test_a_stopped_quickwit_never_fails_the_request_and_the_drop_is_counted(
    qw: Api, qw_app: Flask, quickwit_server: QuickwitStandIn, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    qw_app.extensions[SINK].close()
    qw_app.extensions[SINK] = LogSink(quickwit_server.url, "automation-logs", timeout=2, retries=1, backoff=0.01)
    quickwit_server.stop()
    before = counted(DROPPED, reason="undeliverable")
    assert ship(qw, acme, acme.running, [line("a"), line("b"), line("c")]).json["accepted"] == 3
    forwarded(qw_app)
    assert counted(DROPPED, reason="undeliverable") == before + 3
    assert [x["message"] for x in qw.get(f"/api/v1/jobs/{acme.running}/logs", acme.tokens["viewer"]).json["lines"]] == [
        "a",
        "b",
        "c",
    ]  # the database keeps every line
    scraped = qw.get("/metrics").get_data(as_text=True)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped)
        for s in family.samples
    }
    assert samples[("automation_log_lines_dropped_total", (("reason", "undeliverable"),))] >= 3
    health = qw.get("/health").json
    assert health["status"] == "degraded" and health["components"]["quickwit"]["status"] == "error"


def test_health_reports_a_reachable_quickwit(qw: Api) -> None:
    assert qw.get("/health").json["components"]["quickwit"]["status"] == "ok"


def test_without_quickwit_nothing_is_forwarded_and_search_uses_the_database(
    api: Api, app: Flask, quickwit_server: QuickwitStandIn, world: dict[str, Tenant]
) -> None:
    acme = world["acme"]
    ship(api, acme, acme.running, [line("disk")])
    assert SINK not in app.extensions and quickwit_server.ingests == []
    assert api.get("/api/v1/logs", acme.tokens["viewer"], query_string={"query": "disk"}).json["backend"] == "database"


def test_the_index_config_maps_every_field_of_a_forwarded_document(qw_app: Flask, world: dict[str, Tenant]) -> None:
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy/quickwit/automation-logs.yaml").read_text())
    assert str(config["version"]) in ("0.7", "0.8") and config["index_id"] == qw_app.config["QUICKWIT_INDEX"]
    mapping = config["doc_mapping"]
    fields = {f["name"]: f for f in mapping["field_mappings"]}
    assert mapping["timestamp_field"] == "timestamp" and fields["timestamp"]["type"] == "datetime"
    assert fields["timestamp"]["fast"] is True and mapping["tag_fields"] == ["tenant_id"]
    for name in ("tenant_id", "project_id", "job_id", "task", "level"):
        assert (fields[name]["type"], fields[name]["tokenizer"], fields[name]["fast"]) == ("text", "raw", True), name
    assert fields["message"]["tokenizer"] == "default" and config["search_settings"]["default_search_fields"] == [
        "message"
    ]
    with qw_app.test_request_context():
        job = db.session.get(Job, world["acme"].running)
        assert job is not None
        append_lines(job, 1, [line("x")])
        row = db.session.scalars(select(JobLogLine)).one()
        assert set(document(row)) == set(fields) and set(REQUIRED) <= set(fields)
        db.session.rollback()
