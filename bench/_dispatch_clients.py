"""The sending and watching sides of ``bench/dispatch.py``: the operator's client, the submitters' connections,
the watch on finished jobs, and bare Celery's sender.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
import urllib.parse
import uuid
from typing import Any

import redis
import requests
from _platform import DONE_KEY, NOOP_TASK, RAN_KEY, BenchPlatform, bare_celery, envelope_payload

from dispatch.contract import celery_priority
from dispatch.realtime import tenant_channel

BARE_QUEUE = "bench.bare"
PRIORITY = 5  # the API's default priority, mapped as the publisher maps it
FINAL = {"completed", "failed", "timed_out", "cancelled", "dead_letter"}
WORKFLOW = """\
name: bench
tasks:
  - name: noop
    type: command
    config:
      command: "true"
"""


class BenchError(Exception):
    """Raised when a measured run fails, so its figures would mean nothing."""


class Client:
    """The operator's side of the platform: submit, read, count."""

    def __init__(self, platform: BenchPlatform, token: str) -> None:
        self.url = platform.url + "/api/v1"
        self.token = token
        self.session = self.new_session()

    def new_session(self) -> requests.Session:
        """A keep-alive session carrying the operator's token."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def submit(self, session: requests.Session | None = None) -> str:
        """Submit the bench workflow; return the job id."""
        reply = (session or self.session).post(f"{self.url}/jobs", json={"workflow": WORKFLOW}, timeout=30)
        if reply.status_code != 201:
            raise BenchError(f"POST /api/v1/jobs answered {reply.status_code}: {reply.text[:300]}")
        return str(reply.json()["job_id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """One job with its attempts."""
        reply = self.session.get(f"{self.url}/jobs/{job_id}", timeout=30)
        if reply.status_code != 200:
            raise BenchError(f"GET /api/v1/jobs/{job_id} answered {reply.status_code}: {reply.text[:300]}")
        return dict(reply.json())

    def count(self, state: str) -> int:
        """How many of the tenant's jobs are in ``state``."""
        reply = self.session.get(f"{self.url}/jobs", params={"state": state, "limit": "1"}, timeout=30)
        if reply.status_code != 200:
            raise BenchError(f"GET /api/v1/jobs answered {reply.status_code}: {reply.text[:300]}")
        return int(reply.json()["total"])

    def wait_final(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll a job until it reaches a final state; it must be ``completed``."""
        deadline = time.monotonic() + timeout
        time.sleep(0.05)  # after the claim has usually happened, so that polling does not delay it
        while True:
            job = self.job(job_id)
            if job["state"] in FINAL:
                if job["state"] != "completed":
                    raise BenchError(f"job {job_id} ended {job['state']}: {job.get('error')}")
                return job
            if time.monotonic() > deadline:
                raise BenchError(f"job {job_id} is still {job['state']} after {timeout:.0f} s")
            time.sleep(0.02)


class Submitter:
    """One client thread's kept-alive connection for submissions: http.client, so that the load generator
    spends little of the CPU it measures (requests took about twice as much per call)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        parts = urllib.parse.urlsplit(client.url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
        self.path = parts.path + "/jobs"
        self.headers = {"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"}
        self.body = json.dumps({"workflow": WORKFLOW}).encode()

    def submit(self, jobs: int = 1) -> None:
        """Submit the bench workflow as ``jobs`` jobs: one ``POST /api/v1/jobs``, or a batch of them."""
        path, body = self.path, self.body
        if jobs > 1:
            path, body = self.path + "/batch", json.dumps({"jobs": [{"workflow": WORKFLOW}] * jobs}).encode()
        self.connection.request("POST", path, body=body, headers=self.headers)
        reply = self.connection.getresponse()
        data = reply.read()
        if reply.status != 201:
            raise BenchError(f"POST {path} answered {reply.status}: {data[:300]!r}")

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


class Finished:
    """Counts the tenant's jobs that reached a final state, from the live events the platform publishes on Valkey.

    The script watches the throughput rounds this way rather than by polling ``GET /api/v1/jobs``, whose count
    queries would take the web's CPU from the jobs it measures; an operator's ``automation watch`` follows the
    same events.
    """

    def __init__(self, valkey_url: str, tenant: str) -> None:
        self.valkey = redis.Redis.from_url(valkey_url)
        self.pubsub = self.valkey.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(tenant_channel(tenant))
        self.states: dict[str, str] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._listen, name="finished-jobs", daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        try:
            for message in self.pubsub.listen():
                event = json.loads(message["data"])
                if event.get("task") is None and event.get("state") in FINAL:
                    with self.lock:
                        self.states[event["job_id"]] = event["state"]
        except (redis.ConnectionError, ValueError):  # closed at the end of the run (or Valkey stopped)
            return

    def close(self) -> None:
        """Stop watching."""
        with contextlib.suppress(redis.RedisError):
            self.pubsub.close()
        self.thread.join(timeout=5)

    def count(self, state: str | None = None) -> int:
        """How many jobs ended (in ``state``, if given) since the watch began."""
        with self.lock:
            return sum(1 for s in self.states.values() if state is None or s == state)


class Bare:
    """The sending side of bare Celery, with the platform's settings, to the bare workers' queue."""

    def __init__(self, valkey_url: str) -> None:
        self.celery = bare_celery(valkey_url)
        self.valkey = redis.Redis.from_url(valkey_url)
        self.payload = envelope_payload(WORKFLOW)

    def send(self, mark: str | None = None) -> None:
        """Send one no-op task (with a mark: the worker notes when it started)."""
        self.celery.send_task(
            NOOP_TASK,
            kwargs={"mark": mark, "payload": self.payload},
            queue=BARE_QUEUE,
            task_id=str(uuid.uuid4()),
            priority=celery_priority(PRIORITY),
        )

    def done(self) -> int:
        """How many no-op tasks have run."""
        return int(self.valkey.get(DONE_KEY) or 0)

    def ran_at(self, mark: str, timeout: float = 30.0) -> float:
        """When the task with ``mark`` started (its worker's time.time())."""
        deadline = time.monotonic() + timeout
        while (value := self.valkey.get(RAN_KEY + mark)) is None:
            if time.monotonic() > deadline:
                raise BenchError(f"the bare task {mark} did not run within {timeout:.0f} s")
            time.sleep(0.002)
        return float(value)
