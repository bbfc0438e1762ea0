"""Alembic migrations of the control plane (shipped with the package so `automation db upgrade` works)."""
