"""Project secrets: kept encrypted in the database, named in workflows as ``{{.secrets.NAME}}``, handed to the agent
that claims a job in the claim's answer (never in the envelope, the broker, the job or its logs)."""
