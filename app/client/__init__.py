"""The operator's command line (``automation jobs``, ``automation agents``): a pure REST client of the API.

It never creates the Flask app nor touches the database, and imports only the standard library and
``requests`` (``yaml`` when it must read a workflow), so that the commands start fast on any machine that
can reach the control plane. Configured by ``CONTROL_PLANE_URL`` and ``JWT_TOKEN`` (docs/CLI.md).
"""
