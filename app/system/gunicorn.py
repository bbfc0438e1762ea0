"""gunicorn's settings for the web process: ``gunicorn -c python:app.system.gunicorn 'app:create_app()'``.

- Prometheus's multiprocess directory, so that ``/metrics`` adds up every worker's counters: the directory of
  ``PROMETHEUS_MULTIPROC_DIR`` (its old ``*.db`` files removed), or a new temporary one removed at exit. It is
  set here, when gunicorn reads this file, before anything imports ``prometheus_client``.
- Structured logs (``LOG_FORMAT``, ``LOG_LEVEL``) for gunicorn's own error and access logs too.
- The control plane's beacon (``app.system.beacon``), marked from each worker as soon as it has loaded the app.
- gunicorn's own error answers (a request line or headers it cannot read) in the API's JSON error shape.
- ``SSE_MAX_STREAMS``, when not set: each worker's threads less one (``post_fork``). An event stream holds a
  thread for as long as it lasts, so streams can never take the last thread of a worker from the other requests;
  a stream asked for beyond that is answered 503, and ``automation`` then follows the job by polling.

Command-line options (``--bind``, ``--workers``, ``--threads``) still apply on top of these.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gunicorn.util

from dispatch.logs import REQUEST_TENANT_KEY  # standard library only: imports nothing that reads the metrics dir

JOB_PATH = re.compile(r"^/api/v1/jobs/(?P<job_id>[^/]+)")
# gunicorn names each environ entry "{key}e" among the access line's atoms: the tenant the app left there.
TENANT_ATOM = f"{{{REQUEST_TENANT_KEY}}}e"
TOO_LATE = (
    "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set, so each worker would count alone: "
    "set PROMETHEUS_MULTIPROC_DIR in the web process's environment, or import prometheus_client later"
)


def _metrics_directory() -> tuple[str, bool]:
    """Prepare the multiprocess directory; return it and whether it was made here (and is to be removed)."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):  # the values of a previous run of the web process
            stale.unlink(missing_ok=True)
        return configured, False
    made = tempfile.mkdtemp(prefix="automation-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    return made, True


def _check_not_imported_yet() -> None:
    """Refuse to start with per-worker metrics: prometheus_client read the environment before it was set."""
    values = sys.modules.get("prometheus_client.values")
    if values is not None and values.ValueClass is values.MutexValue:
        raise RuntimeError(TOO_LATE)


def access_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    """The job and tenant of an access-log line (gunicorn logs it after the request): the job of
    ``/api/v1/jobs/<job_id>/...``, and the tenant the app left in the request's environ (``TENANT_ATOM``)."""
    fields: dict[str, Any] = {}
    if record.name == "gunicorn.access" and isinstance(record.args, Mapping):
        match = JOB_PATH.match(str(record.args.get("U", "")))
        if match:
            fields["job_id"] = match["job_id"]
        tenant = record.args.get(TENANT_ATOM)
        if isinstance(tenant, str):
            fields["tenant_id"] = tenant
    return fields


def _logconfig() -> dict[str, Any]:
    from dispatch.logs import add_context_provider
    from dispatch.logs import logconfig_dict as structured

    add_context_provider(access_fields)
    return structured(
        component="web", level=os.environ.get("LOG_LEVEL") or "INFO", fmt=os.environ.get("LOG_FORMAT") or "json"
    )


METRICS_DIRECTORY, _MADE_HERE = _metrics_directory()
# gunicorn's own answers to a request it cannot hand to the app: the code in the API's JSON error shape.
SERVER_ERRORS = {
    400: "invalid_request",
    403: "access_denied",  # a proxy header from an address not in forwarded_allow_ips
    413: "payload_too_large",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    501: "not_implemented",  # a transfer coding it does not take
}


def json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Write gunicorn's answer to a request it refuses itself (a URI or headers too long, a malformed request line)
    as the API's JSON error, like every other error of the API, instead of gunicorn's HTML page."""
    code = SERVER_ERRORS.get(status_int, "internal_error" if status_int >= 500 else "invalid_request")
    body = json.dumps({"error": code, "message": mesg or reason}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + body)


_check_not_imported_yet()
logconfig_dict = _logconfig()  # with it, gunicorn writes access lines even without --access-logfile
gunicorn.util.write_error = json_error  # what its workers call (gunicorn.workers.base), looked up at each call


def post_fork(_server: Any, worker: Any) -> None:
    """In a new worker, before it loads the app: leave one of its threads to requests other than event streams."""
    os.environ.setdefault("SSE_MAX_STREAMS", str(max(0, int(worker.cfg.threads) - 1)))


def post_worker_init(worker: Any) -> None:
    """A worker has loaded the app: mark the control plane's beacon from it now, not only from its first request."""
    from app.system.beacon import start_marking

    start_marking(worker.wsgi)


def child_exit(_server: Any, worker: Any) -> None:
    """A worker ended: let Prometheus's multiprocess files know (its counters stay counted)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, METRICS_DIRECTORY)


def on_exit(_server: Any) -> None:
    """gunicorn stops: remove the temporary metrics directory made at start."""
    if _MADE_HERE:
        shutil.rmtree(METRICS_DIRECTORY, ignore_errors=True)
