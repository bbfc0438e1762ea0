"""Flask control plane: REST API, models, services and authentication (built in a later issue)."""
