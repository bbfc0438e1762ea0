"""The agent: a Celery worker on each managed host that runs workflows with probe (built in a later issue)."""
