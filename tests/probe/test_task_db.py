"""The db task type against a real MariaDB and real SQLite files, run through the public API."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pymysql
import pytest
import yaml

import probe
from probe.results import Status
from probe.tasks import db  # registers the db task type
from probe.tasks._dsn import BAD_DSN, MYSQL_DSN_EXAMPLE, SQLITE_DSN_EXAMPLE, DsnError, parse_mysql_dsn

ODD_PASSWORD = "p@ss:w/rd?#%x"  # every character a dsn parser could trip on


@dataclass
class Target:
    """A database to run the task against: its driver, dsn, placeholder and a direct connection."""

    driver: str
    dsn: str
    connect: Callable[[], Any] | None = None

    @property
    def ph(self) -> str:
        return "%s" if self.driver == "mysql" else "?"

    def named(self, name: str) -> str:
        return f"%({name})s" if self.driver == "mysql" else f":{name}"

    def sql(self, *statements: str) -> list[tuple[Any, ...]]:
        """Run statements directly through the driver and commit; return the last one's rows."""
        assert self.connect is not None
        with contextlib.closing(self.connect()) as conn:
            cursor = conn.cursor()
            for statement in statements:
                cursor.execute(statement)
            rows = [tuple(row) for row in cursor.fetchall()] if cursor.description else []
            conn.commit()
            return rows


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mariadb)])
def target(request: pytest.FixtureRequest, tmp_path) -> Target:
    """An empty database of each driver: a SQLite file, and a fresh MariaDB database."""
    if request.param == "sqlite":
        path = tmp_path / "app.db"
        sqlite3.connect(path).close()
        return Target("sqlite", str(path), lambda: sqlite3.connect(path))
    server = request.getfixturevalue("mariadb_server")
    database = server.fresh_database()
    return Target("mysql", server.go_dsn_for(database), lambda: server.connect(database=database))


@pytest.fixture
def users(target: Target) -> Target:
    """The target with a table of three users."""
    auto = "INT AUTO_INCREMENT PRIMARY KEY" if target.driver == "mysql" else "INTEGER PRIMARY KEY"
    target.sql(
        f"CREATE TABLE users (id {auto}, name VARCHAR(100), active INT)",
        "INSERT INTO users (name, active) VALUES ('ada', 1), ('bob', 0), ('cy', 1)",
    )
    return target


def run_db(
    target: Target,
    query: str = "SELECT 1",
    params: Any = None,
    *,
    task: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> probe.TaskResult:
    """Run a one-task workflow with a db task and return the task's result."""
    options = {"driver": target.driver, "dsn": target.dsn, "query": query, **(config or {})}
    if params is not None:
        options["params"] = params
    spec = {"name": "q", "type": "db", "config": options, **(task or {})}
    workflow = probe.load_workflow(yaml.safe_dump({"name": "db-test", "tasks": [spec]}))
    return probe.run_workflow(workflow, **kwargs).tasks[0]


def error_of(result: probe.TaskResult, status: Status = Status.ERROR) -> str:
    """Return the task's error, checking first that the task ended with ``status``."""
    assert result.status is status, (result.status, result.output)
    assert result.error is not None
    return result.error


def numbers(target: Target, count: int) -> str:
    """Return a query of the numbers 1 to ``count`` in a column ``i`` (MariaDB caps recursion at 1000)."""
    if target.driver == "mysql":
        return f"SELECT seq AS i FROM seq_1_to_{count}"
    return f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count}) SELECT i FROM n"


def test_a_select_returns_its_rows_as_a_json_array_of_objects(users):
    result = run_db(users, f"SELECT id, name FROM users WHERE active = {users.ph} ORDER BY id", [1])
    assert result.status is Status.SUCCEEDED, result.error
    assert json.loads(result.output) == [{"id": 1, "name": "ada"}, {"id": 3, "name": "cy"}]
    assert result.metrics["row_count"] == 2
    assert result.metrics["truncated_rows"] == 0


def test_params_are_bound_so_an_injection_attempt_stays_a_literal(users):
    evil = "x'); DROP TABLE users; --"
    inserted = run_db(users, f"INSERT INTO users (name, active) VALUES ({users.ph}, 0)", [evil])
    found = run_db(users, f"SELECT name FROM users WHERE name = {users.ph} OR name = {users.ph}", [evil, "' OR '1'='1"])
    assert inserted.status is Status.SUCCEEDED, inserted.error
    assert json.loads(found.output) == [{"name": evil}]
    assert users.sql("SELECT COUNT(*) FROM users") == [(4,)]


def test_named_params_are_bound_from_a_mapping(users):
    query = f"SELECT name FROM users WHERE active = {users.named('on')} AND name <> {users.named('not')}"
    result = run_db(users, query, {"on": 1, "not": "ada"})
    assert json.loads(result.output) == [{"name": "cy"}]


def test_an_insert_is_committed_and_reports_affected_rows_and_last_insert_id(users):
    result = run_db(users, f"INSERT INTO users (name, active) VALUES ({users.ph}, 1), ('eve', 1)", ["dan"])
    assert result.status is Status.SUCCEEDED, result.error
    assert result.output == ""
    assert result.metrics["affected_rows"] == 2
    # MariaDB reports the first id of a multi-row insert, SQLite the last.
    assert result.metrics["last_insert_id"] == (4 if users.driver == "mysql" else 5)
    assert users.sql("SELECT name FROM users WHERE id > 3 ORDER BY id") == [("dan",), ("eve",)]


def test_an_update_reports_the_rows_it_changed(users):
    result = run_db(users, f"UPDATE users SET active = {users.ph} WHERE active = 1", [0])
    assert result.metrics["affected_rows"] == 2
    assert "last_insert_id" not in result.metrics and "row_count" not in result.metrics
    assert users.sql("SELECT COUNT(*) FROM users WHERE active = 1") == [(0,)]


def test_only_the_first_1000_rows_are_returned_and_the_rest_are_counted(target):
    result = run_db(target, numbers(target, 1500))
    output = json.loads(result.output)
    assert len(output) == db.MAX_ROWS == 1000
    assert output[0] == {"i": 1} and output[-1] == {"i": 1000}
    assert result.metrics["row_count"] == 1500
    assert result.metrics["truncated_rows"] == 500


def test_rows_past_the_output_limit_are_left_out_whole_so_the_output_stays_json(target):
    result = run_db(target, numbers(target, 100), output_limit=200)
    output = json.loads(result.output)
    assert 10 < len(output) < 100
    assert len(result.output.encode()) <= 200
    assert result.metrics["truncated_rows"] == 100 - len(output)


@pytest.mark.mariadb
def test_mysql_decimals_dates_times_and_bytes_become_json_values(mariadb_server):
    target = Target("mysql", mariadb_server.go_dsn)
    query = (
        "SELECT CAST('12.50' AS DECIMAL(10,2)) AS price, DATE '2024-02-29' AS day, "
        "TIMESTAMP '2024-02-29 13:45:01.250' AS at, TIME '-26:02:03' AS span, "
        "CAST('héllo' AS BINARY) AS text_bytes, UNHEX('00FF10') AS raw, NULL AS nothing, 2.5e0 AS f"
    )
    row = json.loads(run_db(target, query).output)[0]
    assert row == {
        "price": "12.50",
        "day": "2024-02-29",
        "at": "2024-02-29T13:45:01.250000",
        "span": "-26:02:03",
        "text_bytes": "héllo",
        "raw": "AP8Q",
        "nothing": None,
        "f": 2.5,
    }


def test_sqlite_blobs_become_text_or_base64_and_a_repeated_column_name_gets_a_suffix():
    target = Target("sqlite", ":memory:")
    query = "SELECT CAST('héllo' AS BLOB) AS t, x'00ff10' AS raw, 1.5 AS f, 9e999 AS inf, 'a' AS c, 'b' AS c"
    row = json.loads(run_db(target, query).output)[0]
    assert row == {"t": "héllo", "raw": "AP8Q", "f": 1.5, "inf": "inf", "c": "a", "c_2": "b"}


def test_an_sql_error_is_a_task_error_with_the_drivers_message(target):
    error = error_of(run_db(target, "SELECT * FROM x"))
    if target.driver == "sqlite":
        assert error == "sqlite: no such table: x"
    else:
        assert error.startswith("mysql: table '") and "x' doesn't exist (error 1146)" in error


def test_a_second_statement_is_refused(users):
    assert error_of(run_db(users, "SELECT 1; DROP TABLE users")).startswith(f"{users.driver}: ")
    assert users.sql("SELECT COUNT(*) FROM users") == [(3,)]


def test_params_that_do_not_match_the_placeholders_are_an_error(target):
    error = error_of(run_db(target, f"SELECT {target.ph}, {target.ph}", [1]))
    expected = "mysql: params do not match the query's placeholders" if target.driver == "mysql" else "sqlite:"
    assert error.startswith(expected)


@pytest.mark.mariadb
def test_wrong_credentials_name_the_user_but_never_the_password(mariadb_server):
    wrong = "not-the-password-31337"
    dsn = f"{mariadb_server.user}:{wrong}@tcp(127.0.0.1:{mariadb_server.port})/{mariadb_server.database}"
    error = error_of(run_db(Target("mysql", dsn)))
    assert error.startswith(f"mysql: access denied for user '{mariadb_server.user}'@")
    assert wrong not in error


@pytest.mark.mariadb
def test_a_secret_password_reaches_the_server_and_never_the_result(mariadb_server):
    workflow = f"""\
name: db-check
timeout: 30s
tasks:
  - name: count-users
    type: db
    timeout: 5s
    config:
      driver: mysql
      dsn: "{{{{.DB_USER}}}}:{{{{.secrets.DB_PASSWORD}}}}@tcp(127.0.0.1:{{{{.DB_PORT}}}})/{mariadb_server.database}"
      query: "SELECT CURRENT_USER() AS me, %s AS echoed"
      params: ["{{{{.secrets.DB_PASSWORD}}}}"]
"""
    wf = probe.load_workflow(workflow)
    variables = {"DB_USER": mariadb_server.user, "DB_PORT": mariadb_server.port}
    good = probe.run_workflow(wf, variables=variables, secrets={"DB_PASSWORD": mariadb_server.password})
    bad = probe.run_workflow(wf, variables=variables, secrets={"DB_PASSWORD": "wrong-secret-4242"})
    assert good.status is Status.SUCCEEDED, good.tasks[0].error
    assert json.loads(good.tasks[0].output) == [{"me": f"{mariadb_server.user}@%", "echoed": "***"}]
    assert mariadb_server.password not in good.to_json()
    assert "access denied" in error_of(bad.tasks[0])
    assert "wrong-secret-4242" not in bad.to_json()


@pytest.fixture
def odd_user(mariadb_server) -> str:
    """A user whose password holds @ : / ? # %, owning a fresh database; returns the database."""
    database = mariadb_server.fresh_database()
    with mariadb_server.connect_as_root(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("CREATE USER IF NOT EXISTS 'odd'@'%%' IDENTIFIED BY %s", (ODD_PASSWORD,))
        cur.execute(f"GRANT ALL PRIVILEGES ON `{database}`.* TO 'odd'@'%'")
    return database


@pytest.mark.mariadb
@pytest.mark.parametrize(
    "form",
    [
        "odd:{raw}@tcp(127.0.0.1:{port})/{db}",
        "odd:{raw}@tcp(127.0.0.1:{port})/{db}?charset=utf8mb4&tls=false",
        "odd:{raw}@unix({socket})/{db}",
        "mysql://odd:{quoted}@127.0.0.1:{port}/{db}",
        "mysql://odd:{quoted}@localhost/{db}?unix_socket={socket}",
    ],
)
def test_every_dsn_form_reaches_the_server_with_an_awkward_password(mariadb_server, odd_user, form):
    dsn = form.format(
        raw=ODD_PASSWORD,
        quoted=quote(ODD_PASSWORD, safe=""),
        port=mariadb_server.port,
        socket=mariadb_server.socket,
        db=odd_user,
    )
    result = run_db(Target("mysql", dsn), "SELECT CURRENT_USER() AS me, DATABASE() AS db")
    assert result.status is Status.SUCCEEDED, result.error
    assert json.loads(result.output) == [{"me": "odd@%", "db": odd_user}]


@pytest.mark.mariadb
def test_tls_true_is_refused_by_a_server_without_tls_instead_of_falling_back(mariadb_server):
    error = error_of(run_db(Target("mysql", mariadb_server.go_dsn + "?tls=true")))
    assert error.startswith("mysql: SSL is required but the server doesn't support it")


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("u:p@tcp(db.example:3307)/app", ("u", "p", "db.example", 3307, None, "app")),
        ("u:p@tcp(db.example)/app", ("u", "p", "db.example", 3306, None, "app")),
        ("u:p@tcp([::1]:3307)/app", ("u", "p", "::1", 3307, None, "app")),
        ("u@/app", ("u", "", "127.0.0.1", 3306, None, "app")),
        (
            "u:a@b:c/d?e@unix(/run/my.sock)/app?charset=utf8",
            ("u", "a@b:c/d?e", "127.0.0.1", 3306, "/run/my.sock", "app"),
        ),
        ("mysql://u:a%40b%2F%3F@db.example/app", ("u", "a@b/?", "db.example", 3306, None, "app")),
        ("mariadb://u@[::1]:3307/", ("u", "", "::1", 3307, None, None)),
    ],
)
def test_mysql_dsns_parse_in_the_go_form_and_as_urls(dsn, expected):
    d = parse_mysql_dsn(dsn)
    assert (d.user, d.password, d.host, d.port, d.unix_socket, d.database) == expected
    assert "password" not in repr(d)


@pytest.mark.parametrize(
    ("driver", "dsn", "reason"),
    [
        ("mysql", "u:hunter2secret@tcp(db:3306)", "no '/' before the database name"),
        ("mysql", "u:hunter2secret@db:3306/app", "the address must read tcp(host:port) or unix(/path/to/socket)"),
        ("mysql", "u:hunter2secret@tpc(db)/app", "unknown network 'tpc', use tcp or unix"),
        ("mysql", "u:hunter2secret@tcp(db:99999)/app", "the port must be a number from 1 to 65535"),
        ("mysql", "postgres://u:hunter2secret@db/app", "unknown scheme 'postgres', use mysql://"),
        ("mysql", "u:hunter2secret@tcp(db)/app?parseTime=true", "unknown parameter 'parseTime'"),
        ("mysql", "u:hunter2secret@tcp(db)/app?charset=utf9", "unknown charset 'utf9'"),
        ("sqlite", "sqlite://relative.db", "a sqlite:// URL needs an absolute path after it"),
        ("sqlite", "sqlite:///x.db?mode=write", "mode must be one of ro, rw, rwc"),
    ],
)
def test_a_malformed_dsn_is_refused_at_load_with_an_example_and_without_the_password(driver, dsn, reason):
    workflow = {
        "name": "bad",
        "tasks": [{"name": "q", "type": "db", "config": {"driver": driver, "dsn": dsn, "query": "SELECT 1"}}],
    }
    with pytest.raises(probe.WorkflowError) as info:
        probe.load_workflow(yaml.safe_dump(workflow))
    message = str(info.value)
    assert reason in message
    assert (MYSQL_DSN_EXAMPLE if driver == "mysql" else SQLITE_DSN_EXAMPLE) in message
    assert "hunter2secret" not in message


def test_a_templated_dsn_is_checked_once_rendered():
    workflow = probe.load_workflow(
        "name: t\ntasks:\n  - {name: q, type: db, config: {driver: mysql, dsn: '{{.DSN}}', query: SELECT 1}}\n"
    )
    error = error_of(probe.run_workflow(workflow, variables={"DSN": "u:hunter2secret@db:3306/app"}).tasks[0])
    assert error == str(DsnError("mysql", "the address must read tcp(host:port) or unix(/path/to/socket)"))
    assert BAD_DSN.split("{")[0] in error and "hunter2secret" not in error


def test_an_unknown_driver_an_empty_query_and_a_zero_timeout_are_refused_at_load():
    bad = {"driver": "postgres", "dsn": ":memory:", "query": "  ", "timeout": "0s"}
    with pytest.raises(probe.WorkflowError) as info:
        probe.load_workflow(yaml.safe_dump({"name": "b", "tasks": [{"name": "q", "type": "db", "config": bad}]}))
    assert "must be one of mysql, sqlite" in str(info.value)
    bad["driver"] = "sqlite"
    with pytest.raises(probe.WorkflowError) as info:
        probe.load_workflow(yaml.safe_dump({"name": "b", "tasks": [{"name": "q", "type": "db", "config": bad}]}))
    assert db.EMPTY_QUERY in str(info.value) and db.BAD_TIMEOUT in str(info.value)


def test_sqlite_opens_a_path_a_url_or_a_file_uri_but_never_creates_a_file_by_mistake(tmp_path):
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (v TEXT)")
    for dsn in (str(path), f"sqlite://{path}", f"sqlite:///{path}", f"file:{path}"):
        result = run_db(Target("sqlite", dsn), "SELECT COUNT(*) AS n FROM t")
        assert result.output == '[{"n": 0}]', (dsn, result.error)
    missing = tmp_path / "typo.db"
    assert error_of(run_db(Target("sqlite", str(missing)))).startswith("sqlite: unable to open database file")
    assert not missing.exists()
    created = run_db(Target("sqlite", f"sqlite://{missing}?mode=rwc"), "CREATE TABLE t (v TEXT)")
    assert created.status is Status.SUCCEEDED and missing.exists()
    readonly = run_db(Target("sqlite", f"sqlite://{path}?mode=ro"), "INSERT INTO t VALUES ('x')")
    assert error_of(readonly) == "sqlite: attempt to write a readonly database"


def sessions(server, marker: str, database: str) -> list[tuple[Any, ...]]:
    """Return the server's sessions running ``marker`` or connected to ``database``, as root sees them."""
    with server.connect_as_root() as conn, conn.cursor() as cur:
        cur.execute("SHOW FULL PROCESSLIST")
        own = conn.thread_id()
        return [r for r in cur.fetchall() if r[0] != own and (r[3] == database or marker in (r[7] or ""))]


def wait_until_gone(server, marker: str, database: str) -> list[tuple[Any, ...]]:
    """Return the sessions still there after up to a second (a killed session takes a moment to end)."""
    end = time.monotonic() + 1
    while (left := sessions(server, marker, database)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.mark.mariadb
@pytest.mark.parametrize("where", ["task", "config"])
def test_a_mysql_query_that_times_out_is_killed_on_the_server(mariadb_server, where):
    database = mariadb_server.fresh_database()
    target = Target("mysql", mariadb_server.go_dsn_for(database))
    marker = f"slow_{secrets.token_hex(4)}"
    timeout = {where: {"timeout": "1s"}}
    start = time.monotonic()
    result = run_db(target, f"SELECT SLEEP(30) AS {marker}", **timeout)
    assert time.monotonic() - start < 2.5
    assert "abandoned" not in error_of(result, Status.TIMED_OUT)
    assert wait_until_gone(mariadb_server, marker, database) == []


@pytest.mark.mariadb
def test_a_cancelled_mysql_write_is_killed_and_never_committed(mariadb_server):
    database = mariadb_server.fresh_database()
    target = Target("mysql", mariadb_server.go_dsn_for(database), lambda: mariadb_server.connect(database=database))
    target.sql("CREATE TABLE t (v VARCHAR(10))")
    marker = f"late_{secrets.token_hex(4)}"
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    start = time.monotonic()
    result = run_db(target, f"INSERT INTO t SELECT '{marker}' FROM (SELECT SLEEP(30)) AS s", cancel=cancel)
    assert time.monotonic() - start < 2.5
    assert result.status is Status.CANCELLED
    assert wait_until_gone(mariadb_server, marker, database) == []
    assert target.sql("SELECT COUNT(*) FROM t") == [(0,)]


def test_a_long_sqlite_query_is_interrupted_at_its_timeout():
    forever = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT MAX(i) FROM n"
    start = time.monotonic()
    result = run_db(Target("sqlite", ":memory:"), forever, task={"timeout": "1s"})
    assert time.monotonic() - start < 2.5
    assert "abandoned" not in error_of(result, Status.TIMED_OUT)


def test_json_value_keeps_a_mysql_time_past_a_day_and_its_fraction():
    assert db.json_value(dt.timedelta(days=1, hours=2, microseconds=5)) == "26:00:00.000005"
    assert db.json_value(pymysql.Binary(b"\xff")) == "/w=="
