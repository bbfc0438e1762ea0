"""Control-plane Celery side: routing, signing, publishing, reaper and scheduler (built in a later issue)."""
