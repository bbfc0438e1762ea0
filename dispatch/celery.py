"""The control plane's Celery app: the shared settings of DESIGN.md, its own queue, and the beat schedule."""

from __future__ import annotations

from typing import Any

from celery import Celery

from dispatch.contract import CONTROL_QUEUE, DEFAULT_VISIBILITY_TIMEOUT, celery_settings

REAP_TASK = "control.reap_leases"  # running attempts whose lease expired -> lost, then retried or failed
SWEEP_TASK = "control.sweep_pending"  # pending jobs whose publish never happened -> published
FIRE_SCHEDULES_TASK = "control.fire_schedules"  # recurring schedules whose time has come -> jobs
SEAL_AUDIT_TASK = "control.seal_audit"  # audit entries written since the last seal -> hash-chained
PRUNE_SCHEDULE_RUNS_TASK = "control.prune_schedule_runs"  # schedule runs past their retention -> deleted
PRUNE_JOBS_TASK = "control.prune_jobs"  # finished jobs past their retention -> deleted
PRUNE_INTERVAL = 3600.0  # seconds between two pruning passes
# A periodic task still queued after this many of its intervals is dropped (a newer one is queued behind it), so
# that a dispatcher that was down does not run hours of reaps and sweeps, one after the other, when it is back.
STALE_AFTER = 5


def beat_schedule(
    reaper_interval: float,
    sweeper_interval: float,
    scheduler_interval: float | None = None,
    audit_seal_interval: float = 2.0,
) -> dict[str, dict[str, Any]]:
    """The periodic control-plane work, sent by name to the control queue (schedules: as often as the sweeper)."""
    return {
        "seal-audit-log": _every(audit_seal_interval, SEAL_AUDIT_TASK),
        "reap-expired-leases": _every(reaper_interval, REAP_TASK),
        "sweep-unpublished-jobs": _every(sweeper_interval, SWEEP_TASK),
        "fire-recurring-schedules": _every(scheduler_interval or sweeper_interval, FIRE_SCHEDULES_TASK),
        "prune-schedule-runs": _every(PRUNE_INTERVAL, PRUNE_SCHEDULE_RUNS_TASK, expires=PRUNE_INTERVAL),
        "prune-finished-jobs": _every(PRUNE_INTERVAL, PRUNE_JOBS_TASK, expires=PRUNE_INTERVAL),
    }


def _every(seconds: float, task: str, *, expires: float | None = None) -> dict[str, Any]:
    """A beat entry: ``task`` every ``seconds`` on the control queue, dropped if not started within ``expires``
    (default: ``STALE_AFTER`` intervals)."""
    options = {"queue": CONTROL_QUEUE, "expires": seconds * STALE_AFTER if expires is None else expires}
    return {"task": task, "schedule": seconds, "options": options}


def make_celery(
    broker_url: str,
    *,
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT,
    restore_interval: int | None = None,
    reaper_interval: float = 10.0,
    sweeper_interval: float = 5.0,
    scheduler_interval: float | None = None,
    audit_seal_interval: float = 2.0,
    name: str = "control-plane",
    task_cls: type | str | None = None,
) -> Celery:
    """Return the control plane's Celery app configured for ``broker_url``."""
    app = Celery(name, task_cls=task_cls) if task_cls is not None else Celery(name)
    app.conf.update(celery_settings(broker_url, visibility_timeout, restore_interval))
    app.conf.update(
        task_queues=None,
        beat_schedule=beat_schedule(reaper_interval, sweeper_interval, scheduler_interval, audit_seal_interval),
        beat_max_loop_interval=min(reaper_interval, sweeper_interval, scheduler_interval or 5.0, 5.0),
    )
    return app
