"""The control plane's side of structured logs: its processes' set-up, and the job and tenant of a request."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from flask import Flask, g, has_request_context, request

from app.config import ConfigError
from dispatch.logs import add_context_provider, component_for, configure_logging, connect_celery


def request_fields(_record: logging.LogRecord) -> Mapping[str, Any]:
    """The job (``/jobs/<job_id>/...``) and the tenant (the caller's, or ``/tenants/<tenant_id>``) of a request."""
    if not has_request_context():
        return {}
    args = request.view_args or {}
    caller = g.get("principal")
    return {
        "job_id": args.get("job_id"),
        "tenant_id": caller.tenant_id if caller is not None else args.get("tenant_id"),
    }


def init_logging(app: Flask) -> None:
    """Set up this process's logs unless an entry point did (gunicorn's config, a test runner) or it is a test.

    The component is guessed from the command line: gunicorn is ``web``, ``celery worker`` the ``dispatcher``,
    ``celery beat`` the ``scheduler``, ``celery flower`` ``flower``, anything else ``cli``.
    """
    add_context_provider(request_fields)
    if app.testing or logging.getLogger().handlers:
        return
    try:
        configure_logging(
            component=component_for(sys.argv), level=app.config["LOG_LEVEL"], fmt=app.config["LOG_FORMAT"]
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    connect_celery()
