"""The db task type: one SQL statement on MySQL/MariaDB (PyMySQL) or SQLite; rows come back as JSON.

Parameters are always bound by the driver, never formatted into the SQL. A timeout or a cancel really
stops the statement: MySQL's connection is killed on the server from a second connection (``KILL <id>``),
SQLite's is interrupted. A statement that was stopped is never committed.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import logging
import math
import socket
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pymysql
import pymysql.cursors

from probe.durations import DURATION_HELP
from probe.errors import TaskError
from probe.tasks._dsn import MYSQL_DSN_EXAMPLE, SQLITE_DSN_EXAMPLE, DsnError, MysqlDsn, SqliteDsn, parse_dsn
from probe.tasktype import Option, Outcome, TaskContext, TaskType, register

log = logging.getLogger(__name__)

MAX_ROWS = 1000
# Seconds the abort may take to reach the server and kill the statement before it cuts the socket instead.
KILL_TIMEOUT = 1.0
# Seconds past the deadline after which a MySQL read gives up by itself, should the abort not have worked.
READ_BACKSTOP = 2.0
MIN_MASKED = 4  # a password this long or longer is masked in error messages

EMPTY_QUERY = "query is empty"
BAD_TIMEOUT = "timeout must be more than 0"
BAD_PARAMS = "{driver}: params do not match the query's placeholders: {detail}"

Row = Sequence[Any]


@dataclass
class Statement:
    """What a statement did: its columns and first rows when it returned rows, else the rows it changed."""

    columns: list[str] | None
    rows: list[Row]
    row_count: int = 0
    affected_rows: int = 0
    last_insert_id: int | None = None


@register
class DbTask(TaskType):
    """Run one SQL statement on MySQL/MariaDB or SQLite and return its rows as a JSON array of objects."""

    name = "db"
    summary = "run one SQL statement on MySQL/MariaDB or SQLite and return its rows as JSON"
    options = {
        "driver": Option(required=True, choices=("mysql", "sqlite"), help="mysql (MySQL, MariaDB) or sqlite"),
        "dsn": Option(
            required=True,
            help=f"where to connect; mysql: {MYSQL_DSN_EXAMPLE} (a URL's password is percent-decoded; "
            "parameters charset, collation, tls=true|false|skip-verify|preferred, timeout (to connect), unix_socket); "
            f"sqlite: {SQLITE_DSN_EXAMPLE} (the file must exist unless the URL says ?mode=rwc)",
        ),
        "query": Option(
            required=True,
            help="one SQL statement; a write is committed when it succeeds. With params, mysql needs %% "
            "for a literal %",
        ),
        "params": Option(
            kind="list|mapping",
            help="values the driver binds to the query's placeholders, never pasted into the SQL: a list "
            "for mysql %s / sqlite ?, a mapping for mysql %(name)s / sqlite :name",
        ),
        "timeout": Option(
            kind="duration",
            help=f"how long connecting and the statement may take, {DURATION_HELP}; the statement "
            "is then killed on the server (mysql) or interrupted (sqlite) and the task times out",
        ),
    }

    def check(self, config: Mapping[str, Any]) -> list[str]:
        """Return problems: a dsn that does not parse for its driver, an empty query, a zero timeout."""
        problems = []
        driver, dsn = config.get("driver"), config.get("dsn")
        if isinstance(driver, str) and isinstance(dsn, str):
            try:
                parse_dsn(driver, dsn)
            except DsnError as exc:
                problems.append(str(exc))
        query = config.get("query")
        if isinstance(query, str) and not query.strip():
            problems.append(EMPTY_QUERY)
        timeout = config.get("timeout")
        if timeout is not None and timeout <= 0:
            problems.append(BAD_TIMEOUT)
        return problems

    def run(self, config: dict[str, Any], ctx: TaskContext) -> Outcome:
        """Connect, run the statement with its params bound, commit, and return rows or affected rows."""
        driver: str = config["driver"]
        try:
            dsn = parse_dsn(driver, config["dsn"])
        except DsnError as exc:
            raise TaskError(str(exc)) from None
        params = config.get("params") or None
        if isinstance(dsn, MysqlDsn):
            result = _run_mysql(dsn, config["query"], params, ctx)
        else:
            result = _run_sqlite(dsn, config["query"], params, ctx)
        return _outcome(result, ctx, f"{driver} {dsn.describe()}")


def _run_mysql(dsn: MysqlDsn, query: str, params: Any, ctx: TaskContext) -> Statement:
    """Run the statement on MySQL; an abort kills its connection on the server."""
    remaining = max(ctx.remaining(), 0.05)
    kwargs = dsn.connect_kwargs()
    conn = pymysql.connections.Connection(
        **kwargs,
        connect_timeout=min(remaining, dsn.connect_timeout or remaining),
        read_timeout=remaining + READ_BACKSTOP,
        write_timeout=remaining + READ_BACKSTOP,
        cursorclass=pymysql.cursors.SSCursor,
        defer_connect=True,
    )
    killer = _MysqlKiller(conn, kwargs)
    unregister = ctx.on_abort(killer)
    try:
        conn.connect()
        killer.connected = True
        ctx.check()
        cursor = conn.cursor()
        try:  # the driver escapes each value for the connection's character set
            statement = cursor.mogrify(query, params)
        except (pymysql.err.ProgrammingError, TypeError, KeyError, ValueError) as exc:
            detail = f"no value for {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TaskError(BAD_PARAMS.format(driver="mysql", detail=detail)) from exc
        cursor.execute(statement)
        result = _collect(cursor)
        if result.columns is None:
            result.affected_rows, result.last_insert_id = max(cursor.rowcount, 0), cursor.lastrowid or None
        ctx.check()
        conn.commit()
        return result
    except pymysql.err.MySQLError as exc:
        ctx.check()
        raise TaskError(_mysql_message(exc, dsn.password)) from exc
    finally:
        unregister()
        if conn.open:
            conn.close()


class _MysqlKiller:
    """An abort callback: kills the task's MySQL connection from a second one, or cuts its socket."""

    def __init__(self, conn: pymysql.connections.Connection, kwargs: dict[str, Any]) -> None:
        self.conn = conn
        self.kwargs = kwargs
        self.connected = False

    def __call__(self) -> None:
        """Kill the connection on the server; when that cannot be done, shut its socket down."""
        thread_id = getattr(self.conn, "server_thread_id", None)
        if self.connected and thread_id:
            try:
                other = pymysql.connect(
                    **self.kwargs,
                    connect_timeout=KILL_TIMEOUT,
                    read_timeout=KILL_TIMEOUT,
                    write_timeout=KILL_TIMEOUT,
                )
                try:
                    other.kill(thread_id[0])
                finally:
                    other.close()
                log.debug("killed mysql connection %s", thread_id[0])
                return
            except pymysql.err.MySQLError as exc:
                log.info("could not kill mysql connection %s (%s); closing its socket", thread_id[0], exc)
        sock = self.conn._sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)


def _mysql_message(exc: pymysql.err.MySQLError, password: str) -> str:
    """Return the driver's message as ``mysql: <message> (error <code>)``, the password masked."""
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        code, text = exc.args
        message = f"mysql: {_lower_first(str(text))} (error {code})"
    else:
        message = f"mysql: {_lower_first(str(exc))}"
    # Servers do not echo passwords; masking is a second line of defence (not for trivially short ones).
    return message.replace(password, "***") if len(password) >= MIN_MASKED else message


def _run_sqlite(dsn: SqliteDsn, query: str, params: Any, ctx: TaskContext) -> Statement:
    """Run the statement on SQLite; an abort interrupts it."""
    try:
        conn = sqlite3.connect(dsn.target, uri=True, timeout=ctx.remaining(), check_same_thread=False)
    except sqlite3.Error as exc:
        raise TaskError(f"sqlite: {exc}: {dsn.describe()}") from exc
    lock = threading.Lock()
    closed = False

    def interrupt() -> None:
        with lock:
            if not closed:
                conn.interrupt()

    # The handler also catches an abort that came before the statement started, which interrupt() ignores.
    conn.set_progress_handler(lambda: int(ctx.stop.is_set()), 1000)
    unregister = ctx.on_abort(interrupt)
    try:
        cursor = conn.cursor()
        cursor.execute(query, () if params is None else params)
        result = _collect(cursor)
        if result.columns is None:
            result.affected_rows = max(cursor.rowcount, 0)
            result.last_insert_id = cursor.lastrowid or None
        ctx.check()
        conn.commit()
        return result
    except (sqlite3.Error, sqlite3.Warning, OverflowError) as exc:
        ctx.check()
        raise TaskError(f"sqlite: {_lower_first(str(exc))}") from exc
    finally:
        unregister()
        with lock:
            closed = True
            conn.close()


def _collect(cursor: Any) -> Statement:
    """Read the first MAX_ROWS rows and count the rest; a statement without rows has no columns."""
    if cursor.description is None:
        return Statement(columns=None, rows=[])
    columns = _column_names([d[0] for d in cursor.description])
    rows = list(cursor.fetchmany(MAX_ROWS))
    count = len(rows)
    if count == MAX_ROWS:
        for _ in cursor:
            count += 1
    return Statement(columns=columns, rows=rows, row_count=count)


def _column_names(names: list[str]) -> list[str]:
    """Return the column names, a repeated one suffixed ``_2``, ``_3``... so that no value is lost."""
    seen: set[str] = set()
    result = []
    for name in names:
        unique, n = name, 1
        while unique in seen:
            n += 1
            unique = f"{name}_{n}"
        seen.add(unique)
        result.append(unique)
    return result


def _outcome(result: Statement, ctx: TaskContext, where: str) -> Outcome:
    """Return the Outcome: rows as a JSON array that fits the output limit, or the rows changed."""
    if result.columns is None:
        metrics: dict[str, Any] = {"affected_rows": result.affected_rows}
        if result.last_insert_id is not None:
            metrics["last_insert_id"] = result.last_insert_id
        ctx.log(f"{where}: rows affected: {result.affected_rows}")
        return Outcome(ok=True, metrics=metrics)
    parts: list[str] = []
    size = 2  # the brackets
    for row in result.rows:
        obj = {name: json_value(value) for name, value in zip(result.columns, row, strict=True)}
        text = json.dumps(obj, ensure_ascii=False)
        size += len(text.encode("utf-8")) + (2 if parts else 0)
        if size > ctx.output_limit:
            break
        parts.append(text)
    shown = len(parts)
    if shown < result.row_count:
        ctx.log(f"{where}: {result.row_count} rows, the output shows the first {shown}", "warning")
    metrics = {"row_count": result.row_count, "truncated_rows": result.row_count - shown}
    return Outcome(ok=True, output="[" + ", ".join(parts) + "]", metrics=metrics)


def json_value(value: Any) -> Any:
    """Return a column value as JSON can hold it.

    Decimals become strings (exact), dates and times ISO 8601 strings, a MySQL TIME ``[-]HH:MM:SS``, bytes
    their UTF-8 text or else base64, infinite and NaN floats strings.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _time_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(data).decode("ascii")
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    return str(value)


def _time_text(delta: dt.timedelta) -> str:
    """Return a MySQL TIME value (a timedelta, maybe negative or past 24 h) as ``[-]HH:MM:SS[.ffffff]``."""
    sign = "-" if delta < dt.timedelta(0) else ""
    delta = abs(delta)
    minutes, seconds = divmod(delta.days * 86400 + delta.seconds, 60)
    hours, minutes = divmod(minutes, 60)
    fraction = f".{delta.microseconds:06d}" if delta.microseconds else ""
    return f"{sign}{hours:02d}:{minutes:02d}:{seconds:02d}{fraction}"


def _lower_first(text: str) -> str:
    """Lower the first letter of a sentence, not of an acronym ("Access denied" -> "access denied")."""
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        return text[0].lower() + text[1:]
    return text
