"""Fault tests: a platform of real processes per test, whose servers and processes the tests break."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.servers.platform import Platform
from tests.servers.valkey import ValkeyServer


@pytest.fixture
def make_platform(
    valkey_server: ValkeyServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Platform]]:
    """Start a platform with extra environment settings (optionally on another database); stop it after."""
    made: list[Platform] = []

    def make(database_url: str | None = None, **env: str) -> Platform:
        platform = Platform(tmp_path_factory.mktemp("faults"), valkey_server, database_url, **env)
        made.append(platform)
        platform.start()
        return platform

    yield make
    for platform in made:
        platform.stop()
    if not valkey_server.running:
        valkey_server.start()
