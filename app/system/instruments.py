"""The metrics each process counts itself: HTTP requests and latency, refused heartbeats, job run times.

With ``PROMETHEUS_MULTIPROC_DIR`` set before ``prometheus_client`` is imported (the gunicorn config does it),
every worker writes its values to files there and a scrape adds them up; otherwise they live in ``PROCESS``.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from sqlalchemy import event
from sqlalchemy.orm import Session

from app.jobs.states import FINISHED_JOBS
from dispatch import logsink

PROCESS = CollectorRegistry(auto_describe=True)  # this process's own values, when not in multiprocess mode
UNMATCHED = "<unmatched>"  # the endpoint label of requests that matched no route (404, 405)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
HEARTBEAT_ENDPOINT = "agents.heartbeat"
JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 43200.0)
_STARTED = "_metrics_started"

HTTP_REQUESTS = Counter(
    "automation_http_requests",
    "HTTP requests answered, by method, endpoint (the URL rule) and status",
    ("method", "endpoint", "status"),
    registry=PROCESS,
)
HTTP_LATENCY = Histogram(
    "automation_http_request_duration_seconds",
    "Time to answer an HTTP request (to its response headers), by method and endpoint",
    ("method", "endpoint"),
    registry=PROCESS,
)
HEARTBEAT_FAILURES = Counter(
    "automation_agent_heartbeat_failures",
    "Agent heartbeats the API refused or failed to record, by status",
    ("status",),
    registry=PROCESS,
)
JOB_DURATION = Histogram(
    "automation_job_duration_seconds",
    "Run time (started to final state) of the jobs whose final state the control plane's API recorded",
    ("state",),
    buckets=JOB_BUCKETS,
    registry=PROCESS,
)
for _metric in logsink.METRICS:  # the Quickwit log forwarder's counters (dispatch does not import app)
    PROCESS.register(_metric)


def multiprocess() -> bool:
    """Tell whether metric values go to PROMETHEUS_MULTIPROC_DIR (decided when prometheus_client was imported)."""
    return values.ValueClass is not values.MutexValue


def _start_timer() -> None:
    setattr(g, _STARTED, time.perf_counter())


def _count_request(response: Response) -> Response:
    rule = request.url_rule.rule if request.url_rule is not None else UNMATCHED
    method = request.method if request.method in METHODS else "OTHER"
    status = str(response.status_code)
    HTTP_REQUESTS.labels(method, rule, status).inc()
    started = g.pop(_STARTED, None)
    if started is not None:
        HTTP_LATENCY.labels(method, rule).observe(time.perf_counter() - started)
    if request.endpoint == HEARTBEAT_ENDPOINT and response.status_code >= 400:
        HEARTBEAT_FAILURES.labels(status).inc()
    return response


def install_request_hooks(app: Flask) -> None:
    """Count every request of ``app``; call before other ``before_request`` hooks so that refusals are timed too."""
    app.before_request(_start_timer)
    app.after_request(_count_request)


def _observe_finished_jobs(session: Session) -> None:
    for state, seconds in session.info.pop(FINISHED_JOBS, []):
        JOB_DURATION.labels(state).observe(seconds)


def _forget_finished_jobs(session: Session) -> None:
    session.info.pop(FINISHED_JOBS, None)


def install_session_hooks() -> None:
    """Observe job run times when the transaction that finished the job commits (idempotent)."""
    for name, hook in (
        ("after_commit", _observe_finished_jobs),
        ("after_rollback", _forget_finished_jobs),
    ):
        if not event.contains(Session, name, hook):
            event.listen(Session, name, hook)
