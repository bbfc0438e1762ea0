"""The metrics read from the database at scrape time: the same in every process and every web instance.

Jobs and attempts by state, agents registered, active and overdue, and the jobs submitted (counted in the
append-only audit log, so that deleting a job never lowers the counter, and cron jobs submitted by the
dispatcher count too). Prometheus sees one value per web instance: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import InstrumentedAttribute

from app.agents.models import Agent
from app.audit.models import AuditEvent
from app.columns import utcnow
from app.extensions import db
from app.jobs.models import Job, JobAttempt
from app.jobs.states import AttemptState, JobState

log = logging.getLogger(__name__)

SUBMITTED = "job.submitted"  # the audit action of every job created, over the API or by a schedule


def _by_state(column: InstrumentedAttribute[str], states: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(states, 0)
    rows = db.session.execute(select(column, func.count()).group_by(column))
    for state, count in rows:
        counts[str(state)] = int(count)
    return counts


def database_metrics(*, offline_after: int) -> list[GaugeMetricFamily | CounterMetricFamily]:
    """Read the database's metrics; on failure, only ``automation_database_up 0``."""
    up = GaugeMetricFamily("automation_database_up", "1 when the scrape could read the database, else 0")
    try:
        families = _read(offline_after)
    except Exception as exc:  # a scrape must still serve the process's own metrics
        log.warning("metrics: could not read the database: %s", exc)
        db.session.rollback()
        up.add_metric([], 0)
        return [up]
    finally:
        db.session.rollback()  # read-only: end the transaction, release the connection
    up.add_metric([], 1)
    return [up, *families]


def _read(offline_after: int) -> list[GaugeMetricFamily | CounterMetricFamily]:
    jobs = GaugeMetricFamily("automation_jobs", "Jobs in each state", labels=["state"])
    for state, count in _by_state(Job.state, (s.value for s in JobState)).items():
        jobs.add_metric([state], count)
    attempts = GaugeMetricFamily(
        "automation_job_attempts",
        "Attempts (deliveries of jobs) in each state; lost: their lease expired",
        labels=["state"],
    )
    for state, count in _by_state(JobAttempt.state, (s.value for s in AttemptState)).items():
        attempts.add_metric([state], count)

    submitted = CounterMetricFamily(
        "automation_jobs_submitted", "Jobs submitted (over the API or by a schedule), by tenant", labels=["tenant"]
    )
    per_tenant = db.session.execute(
        select(AuditEvent.tenant_id, func.count())
        .where(AuditEvent.action == SUBMITTED, AuditEvent.outcome == "success")
        .group_by(AuditEvent.tenant_id)
    )
    for tenant, count in per_tenant:
        submitted.add_metric([tenant or ""], int(count))

    since = utcnow() - timedelta(seconds=offline_after)
    registered = db.session.scalar(select(func.count()).select_from(Agent)) or 0
    active = db.session.scalar(select(func.count()).where(Agent.last_heartbeat_at >= since)) or 0
    overdue = db.session.scalar(select(func.count()).where(Agent.last_heartbeat_at < since)) or 0
    agents = [
        GaugeMetricFamily("automation_agents_registered", "Agents registered", value=registered),
        GaugeMetricFamily(
            "automation_agents_active", f"Agents whose last heartbeat is at most {offline_after} s old", value=active
        ),
        GaugeMetricFamily(
            "automation_agents_heartbeat_overdue",
            f"Agents that sent heartbeats but none in the last {offline_after} s (AGENT_OFFLINE_AFTER)",
            value=overdue,
        ),
    ]
    return [jobs, attempts, submitted, *agents]


class Families(Collector):
    """A collector that serves metric families computed beforehand (for one scrape's registry)."""

    def __init__(self, families: Iterable[GaugeMetricFamily | CounterMetricFamily]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Yield the families."""
        yield from self.families
