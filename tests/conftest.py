"""Suite-wide configuration: the shared server fixtures and the marker policy for the servers."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.servers.valkey",
    "tests.servers.mariadb",
    "tests.servers.sshd",
    "tests.servers.http",
    "tests.servers.proxy",
    "tests.servers.centrifugo",
    "tests.servers.quickwit",
    "tests.servers.platform",
]

# Tests that use these fixtures, directly or through another fixture, carry these markers.
SERVER_MARKERS = {"mariadb_server": "mariadb", "sshd_server": "sshd"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs MariaDB or sshd, so that `-m "not mariadb"` deselects it."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, marker in SERVER_MARKERS.items():
            if fixture in fixtures and item.get_closest_marker(marker) is None:
                item.add_marker(marker)
