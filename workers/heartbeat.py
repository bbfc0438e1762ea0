"""The agent's registration and heartbeat: keeps it online, renews its leases, and brings cancel requests."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from probe.tasks.powershell import find_powershell
from probe.tasktype import load_plugins, registry
from workers.client import ControlPlane, ControlPlaneError
from workers.jobs import Inflight
from workers.settings import AgentSettings

log = logging.getLogger(__name__)


def agent_version() -> str:
    """The installed version of the platform."""
    try:
        return version("automation-platform")
    except PackageNotFoundError:
        return "unknown"


def task_types() -> list[str]:
    """The task types this host can run: every registered type, powershell only where a PowerShell exists."""
    load_plugins()
    return sorted(name for name in registry if name != "powershell" or find_powershell() is not None)


def registration(settings: AgentSettings) -> dict[str, Any]:
    """The body of this agent's registration."""
    return {
        "agent_id": settings.agent_id,
        "project_id": settings.project_id,
        "hostname": settings.hostname,
        "platform": settings.platform,
        "version": agent_version(),
        "task_types": task_types(),
        "max_concurrent_jobs": settings.concurrency,
    }


def register(client: ControlPlane, settings: AgentSettings) -> None:
    """Register (or update) this agent; raises ControlPlaneError if the control plane refuses."""
    reply = client.call("POST", "/agents", registration(settings), deadline=120)
    if not reply.ok:
        raise ControlPlaneError(f"registration refused: HTTP {reply.status} {reply.body.get('message', '')}")
    log.info("registered as agent %s (%s, %s)", settings.agent_id, settings.platform, settings.hostname)


class Heartbeat(threading.Thread):
    """Sends a heartbeat every interval with the running jobs; passes cancel requests on to them.

    ``lease_time`` reads the control plane's beacon: for how long agents have been able to renew their leases (0: the
    control plane is down; None: no beacon). Without it, every lease runs out after a lease's length.
    """

    def __init__(
        self,
        client: ControlPlane,
        settings: AgentSettings,
        inflight: Inflight,
        lease_time: Callable[[], float | None] | None = None,
    ) -> None:
        super().__init__(name="agent-heartbeat", daemon=True)
        self.client, self.settings, self.inflight = client, settings, inflight
        self.lease_time = lease_time
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.lease_checked = False

    def beat(self, deadline: float | None = None) -> None:
        """Send one heartbeat (tried again until ``deadline`` seconds have passed; default: the interval) and act on
        the reply."""
        # not the runs being abandoned: renewed now, the lease of a run that is being stopped would keep its job
        # running on the control plane for a lease more
        running = [{"job_id": j.job_id, "attempt": j.attempt} for j in self.inflight.snapshot() if not j.abandoned]
        sent = time.monotonic()
        reply = self.client.call(
            "POST",
            f"/agents/{self.settings.agent_id}/heartbeat",
            {"running": running},
            deadline=self.settings.heartbeat_interval if deadline is None else deadline,
        )
        if reply.ok:
            self.inflight.note_lease(reply.body.get("lease_seconds"))
            self.inflight.renewed(_attempts(reply.body.get("leases")), sent)
            self.inflight.cancel(list(reply.body.get("cancel") or []))
            self.inflight.stop(_attempts(reply.body.get("stop")))
            self._check_lease(reply.body.get("lease_seconds"))
        else:
            log.warning("heartbeat refused: HTTP %s %s", reply.status, reply.body.get("message", ""))

    def _check_lease(self, lease: object) -> None:
        """Warn once when this agent beats less than twice per lease of the control plane: a running job's lease
        could then run out between two heartbeats, and the reaper would mark its attempt lost."""
        if self.lease_checked or not isinstance(lease, int | float):
            return
        self.lease_checked = True
        if 2 * self.settings.heartbeat_interval > lease:
            log.warning(
                "HEARTBEAT_INTERVAL %g s is more than half the control plane's lease of %g s (LEASE_SECONDS): "
                "a running job's lease may run out between two heartbeats and its attempt be marked lost",
                self.settings.heartbeat_interval,
                lease,
            )

    def run(self) -> None:
        """Beat until stopped; a failed beat is logged and the next one tried on time. Between beats, stop each run
        whose lease could not be renewed for a lease's length, as soon as that is so."""
        due = 0.0  # time.monotonic() of the next beat
        while not self.stopping.is_set():
            if self.wake.is_set() or time.monotonic() >= due:
                self.wake.clear()
                try:
                    self.beat(self._beat_deadline())
                except ControlPlaneError as exc:
                    log.warning("heartbeat failed: %s", exc)
                except Exception:
                    log.exception("heartbeat crashed; trying again")
                due = time.monotonic() + self.settings.heartbeat_interval
            now = time.monotonic()
            expiry: float | None = None
            try:
                up_for = self._up_for(now)
                self.inflight.abandon_expired(now, up_for)
                expiry = self.inflight.until_expiry(now, up_for)
            except Exception:
                log.exception("checking the running jobs' leases failed; checking again at the next beat")
            wait = due - now if expiry is None else min(due - now, expiry + 0.01)  # 0.01: past the expiry
            self.wake.wait(max(0.0, wait))

    def _beat_deadline(self) -> float:
        """How long a heartbeat may be tried: its interval, but no longer than until a run's lease would run out (at
        least 1 s), so that a control plane out of reach does not hold up the check that stops such a run."""
        expiry = self.inflight.until_expiry(time.monotonic())
        interval = self.settings.heartbeat_interval
        return interval if expiry is None else max(1.0, min(interval, expiry))

    def _up_for(self, now: float) -> float | None:
        """For how long the control plane has been able to renew leases, asked of its beacon only when a run has gone
        a lease without renewal (None: not known, or not needed)."""
        if self.lease_time is None:
            return None
        expiry = self.inflight.until_expiry(now)
        if expiry is None or expiry > 0:
            return None
        try:
            return self.lease_time()
        except Exception as exc:  # Valkey out of reach (or the agent's ACL too old to read the beacon)
            log.warning("could not read the control plane's beacon: %s", exc)
            return None

    def beat_now(self) -> None:
        """Send the next heartbeat at once (a control message hinted at a cancel)."""
        self.wake.set()

    def stop(self) -> None:
        """Stop beating."""
        self.stopping.set()
        self.wake.set()


def _attempts(refs: object) -> list[tuple[str, int]]:
    """The (job id, attempt) pairs of a heartbeat reply's ``leases`` or ``stop`` list; whatever is malformed in it
    is ignored."""
    if not isinstance(refs, list):
        return []
    return [
        (ref["job_id"], ref["attempt"])
        for ref in refs
        if isinstance(ref, dict) and isinstance(ref.get("job_id"), str) and isinstance(ref.get("attempt"), int)
    ]
