"""Entry module of the control plane's Celery processes (Procfile ``dispatcher`` and ``scheduler``).

celery -A app.celery_app:celery worker -Q control
celery -A app.celery_app:celery beat
"""

from __future__ import annotations

from app import create_app

flask_app = create_app()
celery = flask_app.extensions["celery"]
