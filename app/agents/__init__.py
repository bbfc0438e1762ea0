"""Agents: the Celery workers on managed hosts, their registration and heartbeats."""
