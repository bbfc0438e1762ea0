"""``automation agent``: register this host, heartbeat, and run a Celery worker on its queues.

The agent's commands reach the ``automation`` command through the ``automation.commands`` entry-point group,
so the control plane's code never imports the agent.
"""

from __future__ import annotations

import argparse
import logging
import sys

from workers.settings import SettingsError, hide_credentials, load_settings, scrub_environment

log = logging.getLogger(__name__)


def run_agent(args: argparse.Namespace) -> int:
    """Start the agent in the foreground; returns when the worker stops."""
    try:
        hide_credentials()  # first: it may start this process again, before anything heavy is imported
        settings = load_settings()
    except SettingsError as exc:
        print(f"automation agent: {exc}", file=sys.stderr)
        return 2
    # Imported here, not above: what hide_credentials may start again should not have been loaded twice.
    from dispatch.logs import configure_logging, connect_celery
    from workers.app import EX_NOT_ACCEPTED, make_agent
    from workers.client import ControlPlaneError
    from workers.heartbeat import register

    try:
        configure_logging(
            component="agent", level=settings.log_level, fmt=settings.log_format, tenant_id=settings.tenant_id
        )
    except ValueError as exc:
        print(f"automation agent: {exc}", file=sys.stderr)
        return 2
    connect_celery()  # Celery keeps this handler; each task's lines carry its job id
    try:
        agent = make_agent(settings)
    except ValueError as exc:  # a proxy URL it cannot use
        print(f"automation agent: {exc}", file=sys.stderr)
        return 2
    scrub_environment()  # workflows run in this process's environment: keep the agent's credentials out
    try:
        register(agent.client, settings)
    except ControlPlaneError as exc:
        print(f"automation agent: cannot register with {settings.control_plane_url}: {exc}", file=sys.stderr)
        return 1
    agent.heartbeat.start()
    agent.control.start()
    log.info("consuming %s", ", ".join(agent.queues))
    try:
        agent.celery.worker_main(agent.worker_argv())
    finally:
        agent.control.stop()
        agent.outbox.close(settings.report_deadline)  # the last final states, their leases renewed meanwhile
        agent.heartbeat.stop()
    if agent.refused:
        print(f"automation agent: stopped: {agent.refused[0]}", file=sys.stderr)
        return EX_NOT_ACCEPTED
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``agent`` to the ``automation`` command (entry point ``automation.commands``)."""
    parser = subparsers.add_parser(
        "agent",
        help="run this host's agent (configured by environment variables)",
        description="Register this host with the control plane and run its jobs. Reads CONTROL_PLANE_URL, "
        "TENANT_ID, PROJECT_ID, AGENT_ID, JWT_TOKEN, VALKEY_URL, JOB_VERIFY_KEY and optionally "
        "LOG_LEVEL, HEARTBEAT_INTERVAL, AGENT_CONCURRENCY.",
    )
    parser.set_defaults(run=run_agent)


def main(argv: list[str] | None = None) -> int:
    """Run the agent without the ``automation`` command (``python -m workers``)."""
    parser = argparse.ArgumentParser(prog="automation")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["agent", *(argv or [])])
    return int(args.run(args))
