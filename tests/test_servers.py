"""The server fixtures start real servers that answer on loopback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from tests.servers._util import port_is_open
from tests.servers.http import HTTPTestServer
from tests.servers.mariadb import MariaDBServer
from tests.servers.proxy import Gateway
from tests.servers.sshd import SSHServer
from tests.servers.valkey import ValkeyServer


def test_valkey_answers_ping_and_keeps_its_data_across_a_restart(valkey_server: ValkeyServer) -> None:
    with valkey_server.client() as client:
        assert client.ping() is True
        client.set("harness:restart", "kept")
    try:
        valkey_server.stop()
        assert not port_is_open(valkey_server.host, valkey_server.port)
    finally:
        valkey_server.start()
    with valkey_server.client(decode_responses=True) as client:
        assert client.get("harness:restart") == "kept"
        client.delete("harness:restart")


@pytest.mark.mariadb
def test_mariadb_lets_the_user_create_and_query_tables(mariadb_server: MariaDBServer) -> None:
    with mariadb_server.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE harness_probe (id INT PRIMARY KEY, name VARCHAR(20))")
        cur.execute("INSERT INTO harness_probe VALUES (1, 'ok')")
        conn.commit()
        cur.execute("SELECT name, CURRENT_USER() FROM harness_probe")
        assert cur.fetchone() == ("ok", f"{mariadb_server.user}@%")
        cur.execute("DROP TABLE harness_probe")
    with mariadb_server.connect(host=None, unix_socket=mariadb_server.socket) as conn, conn.cursor() as cur:
        cur.execute("SELECT DATABASE()")
        assert cur.fetchone() == (mariadb_server.database,)


@pytest.mark.mariadb
def test_a_fresh_database_is_empty_and_owned_by_the_user(mariadb_server: MariaDBServer) -> None:
    name = mariadb_server.fresh_database()
    with mariadb_server.connect(database=name) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT)")
        cur.execute("SHOW TABLES")
        assert cur.fetchall() == (("t",),)
    assert mariadb_server.fresh_database(name) == name
    with mariadb_server.connect(database=name) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        assert cur.fetchall() == ()


@pytest.mark.sshd
def test_ssh_runs_a_command_with_the_client_key_and_known_hosts(sshd_server: SSHServer) -> None:
    result = subprocess.run(sshd_server.ssh_command("echo", "hi"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"


@pytest.mark.sshd
def test_ssh_refuses_the_server_when_its_host_key_is_unknown(sshd_server: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    argv = sshd_server.ssh_command("echo", "hi", known_hosts=str(empty))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 255
    assert "Host key verification failed" in result.stderr
    assert result.stdout == ""


def test_the_gateway_relays_answers_and_loses_only_those_it_is_told_to_after_forwarding(
    http_server: HTTPTestServer,
) -> None:
    http_server.route("/api/v1/jobs/j/claim", method="POST", status=200, body='{"ok": true}')
    gateway = Gateway(http_server.url)
    try:
        gateway.lose_answers("POST", "/claim")
        lost = requests.post(f"{gateway.url}/api/v1/jobs/j/claim", json={"attempt": 1}, timeout=5)
        relayed = requests.post(f"{gateway.url}/api/v1/jobs/j/claim?x=1", json={"attempt": 1}, timeout=5)
    finally:
        gateway.close()
    assert lost.status_code == 502 and relayed.status_code == 200 and relayed.json() == {"ok": True}
    assert [r.body for r in http_server.requests] == [b'{"attempt": 1}'] * 2  # both reached the server
    assert gateway.lost == ["POST /api/v1/jobs/j/claim"]
