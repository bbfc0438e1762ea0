"""The examples are valid, and the complete one runs against real servers when its hosts are given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import probe

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_is_a_valid_workflow(path: Path):
    assert probe.load_workflow(path).tasks


def test_hello_runs_here_with_the_probe_command():
    proc = subprocess.run(
        [sys.executable, "-m", "probe.cli", "run", "examples/hello.yaml", "--var", "WHO=tests"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "✓ workflow hello succeeded" in proc.stdout


def test_the_complete_example_runs_against_real_ssh_mariadb_and_http(
    sshd_server, mariadb_server, http_server, tmp_path
):
    http_server.route("/health", body="ok")
    database = mariadb_server.fresh_database()
    variables = {
        "APP_URL": http_server.url,
        "WORKDIR": str(tmp_path),
        "SSH_HOST": sshd_server.host,
        "SSH_PORT": sshd_server.port,
        "SSH_USER": sshd_server.user,
        "SSH_KEY": sshd_server.client_key,
        "KNOWN_HOSTS": sshd_server.known_hosts,
        "DB_HOST": mariadb_server.host,
        "DB_PORT": mariadb_server.port,
        "DB_USER": mariadb_server.user,
        "DB_NAME": database,
    }
    result = probe.run_workflow(
        probe.load_workflow(EXAMPLES[0].parent / "complete.yaml"),
        variables=variables,
        secrets={"DB_PASSWORD": mariadb_server.password},
    )
    assert result.success, [(t.name, t.status, t.error, t.output[:300]) for t in result.tasks if not t.success]
    assert (tmp_path / "shipped-2026.11.1.txt").read_text() == "release 2026.11.1\n"
    assert result.task("report").output == "release 2026.11.1 shipped; health answered 200\n"
    with mariadb_server.connect(database=database) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT version, shipped FROM releases")
        [(version, shipped)] = cursor.fetchall()
    assert version == "2026.11.1" and shipped.endswith("release 2026.11.1\n")
    assert mariadb_server.password not in result.to_json()
