"""End-to-end tests: the platform's real processes (gunicorn, Celery workers and beat, agents) on loopback."""

from __future__ import annotations

pytest_plugins = ["tests.servers.platform"]
