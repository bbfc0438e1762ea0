"""What the control plane and the agents agree on: task and queue names, envelope fields, Celery settings.

Standard library only: the agent imports this module and nothing else of ``dispatch``.
"""

from __future__ import annotations

import json
import re
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

RUN_JOB_TASK = "workers.run_job"  # the agent's task, sent by name
CONTROL_QUEUE = "control"  # the control plane's own Celery work
PLATFORMS = ("linux", "windows", "darwin")
ENVELOPE_VERSION = 1
ENVELOPE_FIELDS = (
    "v",
    "aud",
    "tenant",
    "project",
    "job_id",
    "attempt",
    "iat",
    "exp",
    "nonce",
    "name",
    "workflow",
    "variables",
)
DEFAULT_VISIBILITY_TIMEOUT = 12 * 3600  # longer than the longest job a workflow may declare
MAX_PRIORITY = 9
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it can be part of a queue name (letters, digits, '-' and '_'), else raise ValueError."""
    if not _NAME.fullmatch(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 letters, digits, '-' or '_'")
    return value


def agent_queue(tenant: str, agent_id: str) -> str:
    """The queue of jobs pinned to one agent."""
    return f"agent.{check_name('tenant', tenant)}.{check_name('agent id', agent_id)}"


def shared_queue(tenant: str, project: str, platform: str) -> str:
    """The queue shared by every agent of a project and platform."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    return f"tenant.{check_name('tenant', tenant)}.{check_name('project', project)}.{platform}"


def is_shared_queue(queue: str) -> bool:
    """Whether ``queue`` (a message's audience) is a project's shared queue, not one agent's own."""
    return queue.startswith("tenant.")


def control_channel(tenant: str, agent_id: str) -> str:
    """The Valkey pub/sub channel on which the control plane tells one agent to cancel a job at once."""
    return f"automation.control.{check_name('tenant', tenant)}.{check_name('agent id', agent_id)}"


def deliveries_key(celery_task_id: str, scope: str = "automation") -> str:
    """The Valkey counter of deliveries of one message that never finished (a poison message crashes agents).

    An isolated agent keeps its counters under its own queue's name (``scope``), inside its ACL.
    """
    return f"{scope}.deliveries.{celery_task_id}"


def event_exchange(tenant: str) -> str:
    """The Celery event exchange of a tenant's isolated agents (their task events stay within the tenant)."""
    return f"ev.{check_name('tenant', tenant)}"


def isolated_transport_options(tenant: str, agent_id: str) -> dict[str, str]:
    """kombu's bookkeeping of unacknowledged messages under the agent's own names, not the broker-wide ones."""
    prefix = agent_queue(tenant, agent_id)
    return {
        "unacked_key": f"{prefix}.unacked",
        "unacked_index_key": f"{prefix}.unacked_index",
        "unacked_mutex_key": f"{prefix}.unacked_mutex",
    }


# The control plane's beacon (dispatch.beacon): one key, which the web marks and the reaper and agents read.
BEACON_KEY = "automation.controlplane.beacon"

# What an isolated agent sends to Valkey: kombu's consumer and producer commands, its scripts, and pub/sub.
AGENT_ACL_COMMANDS = (
    "+ping +hello +auth +client|setinfo +client|setname +select +quit +reset"
    " +brpop +lpush +rpush +rpop +llen +del +exists +pexpire +expire +incr"
    " +sadd +srem +smembers +hset +hget +hdel +zadd +zrem +zrange +zrangebyscore +zrevrangebyscore"
    " +set +get +evalsha +script|load +script|exists +multi +exec +discard +watch +unwatch +time"
    " +publish +subscribe +unsubscribe +psubscribe +punsubscribe"
)


def agent_acl(tenant: str, project: str, agent_id: str, platform: str, password: str, db: int = 0) -> list[str]:
    """The ``ACL SETUSER`` arguments of an isolated agent: its queues, its own keys and channels, nothing else.

    The user is ``agent-<tenant>-<agent_id>``. The keys are its pinned queue and its project's queue for its
    platform (with their priority lists and kombu's binding sets), its unacknowledged-message bookkeeping and
    poison counters (``agent.<tenant>.<agent_id>.*``), and kombu's shared binding-expiry set; the channels are
    its control channel and its tenant's Celery event exchange (in database ``db``, as kombu names it). It may
    also read, and only read, the control plane's beacon.
    """
    own, shared = agent_queue(tenant, agent_id), shared_queue(tenant, project, platform)
    keys = [own, f"{own}:*", f"{own}.*", shared, f"{shared}:*", "_kombu.binding_deadlines"]
    for queue in (own, shared):
        keys += [f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    channels = [control_channel(tenant, agent_id), f"/{db}.{event_exchange(tenant)}/*"]
    readable = [BEACON_KEY]  # read only: whether the control plane can renew leases (dispatch.beacon)
    return [
        f"agent-{tenant}-{agent_id}",
        "reset",
        "on",
        f">{password}",
        "resetkeys",
        "resetchannels",
        "-@all",
        *AGENT_ACL_COMMANDS.split(),
        *(f"~{key}" for key in keys),
        *(f"%R~{key}" for key in readable),
        *(f"&{channel}" for channel in channels),
    ]


def task_id(job_id: str, attempt: int) -> str:
    """The Celery task id of one attempt of a job."""
    return f"{job_id}:{attempt}"


def celery_priority(priority: int) -> int:
    """Map an API priority (0 lowest .. 9 most urgent) onto Valkey's (0 served first)."""
    return MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))


def canonical_json(payload: dict[str, Any]) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def transport_options(
    visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT, restore_interval: int | None = None
) -> dict[str, Any]:
    """The broker transport options every process uses, identical everywhere.

    ``restore_interval`` is how often (seconds) a consumer puts back messages unacknowledged for longer than
    the visibility timeout (kombu's default: about every 100 s).
    """
    restore = {"unacked_restore_interval": restore_interval, "unacked_restore_throttle": 1} if restore_interval else {}
    return {
        **restore,
        "visibility_timeout": visibility_timeout,
        "priority_steps": list(range(MAX_PRIORITY + 1)),
        "queue_order_strategy": "priority",
        "sep": ":",
        "socket_timeout": 30,
        "socket_connect_timeout": 10,
        "socket_keepalive": True,
        "retry_on_timeout": True,
        "health_check_interval": 25,
    }


SHARED_CLIENT_TRANSPORT = "dispatch.transport:Transport"  # kombu's Redis transport, one client per pool


def celery_settings(
    broker_url: str, visibility_timeout: int = DEFAULT_VISIBILITY_TIMEOUT, restore_interval: int | None = None
) -> dict[str, Any]:
    """The Celery settings of DESIGN.md shared by the control plane, the agents and Flower."""
    settings: dict[str, Any] = {
        "broker_url": broker_url,
        "broker_transport_options": transport_options(visibility_timeout, restore_interval),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_ignore_result": True,
        "task_default_queue": CONTROL_QUEUE,
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
    }
    scheme = broker_url.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        settings["broker_transport"] = SHARED_CLIENT_TRANSPORT
    if scheme == "rediss" and not any(name.startswith("ssl_") for name in parse_qs(urlsplit(broker_url).query)):
        # Named by the transport above, kombu no longer sees the scheme: a bare rediss:// URL would connect in
        # plain text (and kombu's own transport would use TLS without checking the certificate). TLS, verified
        # against the system's CAs and the URL's host name, unless the URL's ssl_* parameters say otherwise.
        settings["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return settings
