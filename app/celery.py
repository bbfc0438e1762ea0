"""The control plane's Celery app, made by the app factory when a broker is configured (VALKEY_URL)."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from flask import Flask

from dispatch.celery import make_celery
from dispatch.publish import Publisher
from dispatch.signing import Signer, load_signing_key


def init_celery(app: Flask) -> Celery | None:
    """Bind a Celery app and a job publisher to ``app``; without a broker URL, jobs stay ``pending``."""
    url = app.config["VALKEY_URL"]
    if not url:
        return None

    class FlaskTask(Task):
        """Runs every task inside the Flask app's context, so services can use the database."""

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = make_celery(
        url,
        visibility_timeout=app.config["BROKER_VISIBILITY_TIMEOUT"],
        restore_interval=app.config["BROKER_RESTORE_INTERVAL"],
        reaper_interval=app.config["REAPER_INTERVAL"],
        sweeper_interval=app.config["SWEEPER_INTERVAL"],
        audit_seal_interval=app.config["AUDIT_SEAL_INTERVAL"],
        name=app.import_name,
        task_cls=FlaskTask,
    )
    celery.set_default()
    signer = Signer(load_signing_key(app.config["JOB_SIGNING_KEY"]), ttl=app.config["ENVELOPE_TTL"])
    app.extensions["celery"] = celery
    app.extensions["publisher"] = Publisher(celery, signer)
    from app.audit import tasks as audit_tasks  # noqa: F401  (the audit sealer)
    from app.jobs import tasks  # noqa: F401  (registers the control plane's periodic tasks)

    return celery
