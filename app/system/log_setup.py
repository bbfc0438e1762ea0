"""The control plane's side of structured logs: its processes' set-up, and the job and tenant of a request."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from flask import Flask, g, has_request_context, request

from app.config import ConfigError
from dispatch.logs import REQUEST_TENANT_KEY, add_context_provider, component_for, configure_logging, connect_celery


def _request_tenant() -> str | None:
    """The tenant of the current request: the caller's, or the one of ``/tenants/<tenant_id>`` (None if neither)."""
    caller = g.get("principal")
    return caller.tenant_id if caller is not None else (request.view_args or {}).get("tenant_id")


def request_fields(_record: logging.LogRecord) -> Mapping[str, Any]:
    """The job (``/jobs/<job_id>/...``) and the tenant (the caller's, or ``/tenants/<tenant_id>``) of a request."""
    if not has_request_context():
        return {}
    return {"job_id": (request.view_args or {}).get("job_id"), "tenant_id": _request_tenant()}


def _leave_tenant_for_access_line(_error: BaseException | None) -> None:
    """Put the request's tenant, if known, in its WSGI environ, where gunicorn's access line finds it (a teardown: it
    runs after refused and failed requests too)."""
    tenant = _request_tenant()
    if tenant is not None:
        request.environ[REQUEST_TENANT_KEY] = tenant


def init_logging(app: Flask) -> None:
    """Set up this process's logs unless an entry point did (gunicorn's config, a test runner) or it is a test.

    The component is guessed from the command line: gunicorn is ``web``, ``celery worker`` the ``dispatcher``,
    ``celery beat`` the ``scheduler``, ``celery flower`` ``flower``, anything else ``cli``.
    """
    add_context_provider(request_fields)
    app.teardown_request(_leave_tenant_for_access_line)
    if app.testing or logging.getLogger().handlers:
        return
    try:
        configure_logging(
            component=component_for(sys.argv), level=app.config["LOG_LEVEL"], fmt=app.config["LOG_FORMAT"]
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    connect_celery()
