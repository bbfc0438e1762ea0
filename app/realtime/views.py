"""The live-status blueprint: Centrifugo tokens, and a job's events as Server-Sent Events."""

from __future__ import annotations

import logging
import re

import redis
from flask import Blueprint, Response, current_app, request, stream_with_context

from app.api import ERR_READ, ERR_WRITE, READERS, body, document, query, reply
from app.auth.guard import principal, require
from app.errors import BadRequest, ServiceUnavailable
from app.realtime import service
from app.realtime.events import EXTENSION
from app.realtime.schemas import EventsQuery, LiveEventOut, RealtimeToken, TokenRequest
from app.realtime.stream import JobStream
from dispatch.realtime import Fanout

log = logging.getLogger(__name__)

bp = Blueprint("realtime", __name__, url_prefix="/api/v1")

NO_VALKEY = "live events need Valkey, and VALKEY_URL is not set"
VALKEY_DOWN = "live events are unavailable: Valkey cannot be reached; try again shortly"
BAD_LAST_EVENT_ID = "Last-Event-ID must be a whole number of at least 0, got {value!r}"
EVENT_ID = re.compile(r"[0-9]{1,18}")  # an event number; 18 digits stay within a signed 64-bit integer
NO_STREAM_SLOT = (
    "this web process already serves {limit} event streams (SSE_MAX_STREAMS), as many as it may; try again shortly, "
    "or follow the job with GET /api/v1/jobs/{job_id}"
)
STREAM_SLOT_RETRY = 5  # seconds, in Retry-After
SLOTS = "event_stream_slots"  # the app extension: a semaphore of SSE_MAX_STREAMS, or None for no limit
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@bp.post("/realtime/token")
@document(
    "A Centrifugo connection token and subscription tokens for the caller's tenant channel and, if asked, a job's",
    body=TokenRequest,
    responses={200: RealtimeToken},
    errors={**ERR_WRITE, 503: ("realtime_not_configured",)},
)
@require(*READERS, action="follow jobs")
def token() -> Response:
    """Issue Centrifugo tokens."""
    data = body(TokenRequest, optional=True)
    return reply(service.issue_tokens(caller=principal(), job_id=data.job_id))


def _last_event_id() -> int:
    """Where the client resumes: the ``Last-Event-ID`` header, else ``?last_event_id=``, else 0."""
    params = query(EventsQuery)
    header = request.headers.get("Last-Event-ID")
    if header is None or not header.strip():
        return params.last_event_id or 0
    if not EVENT_ID.fullmatch(header.strip()):  # ASCII digits only: str.isdigit also takes '²', which int() refuses
        raise BadRequest(BAD_LAST_EVENT_ID.format(value=header[:40]))
    return int(header.strip())


@bp.get("/jobs/<job_id>/events")
@document(
    "Follow a job's live events (Server-Sent Events: id, event 'job', data); ends after the job's final state",
    query=EventsQuery,
    responses={200: LiveEventOut},
    errors={**ERR_READ, 400: ("invalid_request",), 503: ("events_unavailable",)},
    headers=("Last-Event-ID",),
    media_type="text/event-stream",
)
@require(*READERS, action="follow jobs")
def events(job_id: str) -> Response:
    """Stream a job's events."""
    after = _last_event_id()
    job = service.job_snapshot(caller=principal(), job_id=job_id)
    fanout = current_app.extensions.get(EXTENSION)
    if not isinstance(fanout, Fanout):
        raise ServiceUnavailable(NO_VALKEY, code="events_unavailable")
    config = current_app.config
    slots = current_app.extensions[SLOTS]
    if slots is not None and not slots.acquire(blocking=False):
        limit = config["SSE_MAX_STREAMS"]
        log.info("event stream of job %s refused: %s streams open in this process", job_id, limit)
        raise ServiceUnavailable(
            NO_STREAM_SLOT.format(limit=limit, job_id=job_id),
            code="events_unavailable",
            headers={"Retry-After": str(STREAM_SLOT_RETRY)},
        )
    stream = JobStream(
        fanout,
        job,
        after=after,
        keepalive=float(config["SSE_KEEPALIVE"]),
        lifetime=float(config["SSE_MAX_SECONDS"]),
        reread=service.reread,
    )
    opened = False
    try:
        stream.open()
        opened = True
    except (redis.RedisError, OSError) as exc:
        log.warning("cannot stream the events of job %s: %s", job_id, exc)
        raise ServiceUnavailable(VALKEY_DOWN, code="events_unavailable") from None
    finally:
        if not opened and slots is not None:
            slots.release()  # whatever stopped the stream: its slot is free again
    response = Response(stream_with_context(stream.frames()), mimetype="text/event-stream", headers=STREAM_HEADERS)
    response.call_on_close(stream.close)
    if slots is not None:
        response.call_on_close(slots.release)
    return response
