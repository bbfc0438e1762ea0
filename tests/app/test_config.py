"""Configuration: defaults, environment overrides read by the factory, and the instance-folder fallbacks."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from app import create_app
from app.config import ConfigError, database_url, from_environment, jwt_secret


def test_environment_overrides_are_converted_to_their_types() -> None:
    settings = from_environment(
        {
            "LEASE_SECONDS": "120",
            "RATE_LIMIT_ENABLED": "no",
            "VALKEY_URL": "redis://v/0",
            "JWT_SECRET": "",
            "UNRELATED": "x",
        }
    )
    assert settings == {"LEASE_SECONDS": 120, "RATE_LIMIT_ENABLED": False, "VALKEY_URL": "redis://v/0"}


@pytest.mark.parametrize("raw", ["ture", "enabled", "2"])
def test_a_misspelt_switch_is_refused_not_taken_for_false(raw: str) -> None:
    with pytest.raises(ConfigError, match="RATE_LIMIT_ENABLED must be true or false"):
        from_environment({"RATE_LIMIT_ENABLED": raw})
    assert from_environment({"RATE_LIMIT_ENABLED": " OFF "}) == {"RATE_LIMIT_ENABLED": False}
    assert from_environment({"RATE_LIMIT_ENABLED": "Yes"}) == {"RATE_LIMIT_ENABLED": True}


def test_a_malformed_number_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="LEASE_SECONDS must be a whole number"):
        from_environment({"LEASE_SECONDS": "ninety"})


def test_without_a_database_url_an_sqlite_file_in_the_instance_folder_is_used(tmp_path: Path) -> None:
    url = database_url(None, str(tmp_path / "instance"))
    assert url == f"sqlite:///{tmp_path / 'instance' / 'automation.db'}" and (tmp_path / "instance").is_dir()


def test_without_a_jwt_secret_one_is_made_once_and_kept_private(tmp_path: Path) -> None:
    first = jwt_secret(None, str(tmp_path))
    assert len(first) >= 32 and jwt_secret(None, str(tmp_path)) == first
    assert stat.S_IMODE((tmp_path / "jwt-secret").stat().st_mode) == 0o600


def test_a_short_jwt_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 32"):
        jwt_secret("short", "/nonexistent")


def test_the_factory_reads_the_environment_when_the_app_is_made(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("JWT_SECRET", "e" * 40)
    monkeypatch.setenv("MAX_WORKFLOW_BYTES", "1234")
    app = create_app()
    assert app.config["MAX_WORKFLOW_BYTES"] == 1234 and app.config["JWT_SECRET"] == "e" * 40
    assert create_app({"MAX_WORKFLOW_BYTES": 99}).config["MAX_WORKFLOW_BYTES"] == 99
