"""Data source names of the db task: MySQL in the Go driver's form or as a URL, SQLite as a path or URL.

Parsing never puts the password into an error message: a DSN usually holds a secret.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from pymysql.charset import charset_by_name

from probe.durations import parse_duration

MYSQL_DSN_EXAMPLE = (
    "user:password@tcp(host:3306)/database, user:password@unix(/run/mysqld/mysqld.sock)/database "
    "or mysql://user:password@host:3306/database"
)
SQLITE_DSN_EXAMPLE = "/path/to/file.db, :memory:, sqlite:///path/to/file.db or sqlite:///path/to/file.db?mode=ro"
BAD_DSN = "dsn is not a valid {driver} dsn ({reason}); write it like {example}"

MYSQL_PARAMS = ("charset", "collation", "tls", "timeout", "unix_socket")
TLS_MODES = ("true", "false", "skip-verify", "preferred")
SQLITE_PARAMS = {"mode": ("ro", "rw", "rwc"), "immutable": ("0", "1")}
DEFAULT_PORT = 3306

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_BAD_ADDRESS = "the address must read tcp(host:port) or unix(/path/to/socket)"
_MYSQL_SCHEMES = ("mysql", "mariadb", "mysql+pymysql")
# [user[:password]@][net[(address)]]/database[?params]; the password may hold any character.
_GO_DSN = re.compile(
    r"(?:(?P<userinfo>.*)@)?(?:(?P<net>\w+)(?:\((?P<addr>[^()]*)\))?)?/(?P<db>[^/?]*)(?:\?(?P<query>.*))?",
    re.DOTALL,
)


class DsnError(ValueError):
    """Raised when a dsn does not parse; the message shows the right form and never the password."""

    def __init__(self, driver: str, reason: str) -> None:
        example = MYSQL_DSN_EXAMPLE if driver == "mysql" else SQLITE_DSN_EXAMPLE
        super().__init__(BAD_DSN.format(driver=driver, reason=reason, example=example))


@dataclass(frozen=True)
class MysqlDsn:
    """Where and as whom to connect to MySQL or MariaDB."""

    user: str | None = None
    password: str = field(default="", repr=False)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    unix_socket: str | None = None
    database: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def connect_kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments of ``pymysql.connect`` for this dsn (without timeouts)."""
        kwargs: dict[str, Any] = {"user": self.user, "password": self.password, "database": self.database}
        if self.unix_socket:
            kwargs["unix_socket"] = self.unix_socket
        else:
            kwargs["host"], kwargs["port"] = self.host, self.port
        kwargs["charset"] = self.params.get("charset", "utf8mb4")
        if "collation" in self.params:
            kwargs["collation"] = self.params["collation"]
        tls = self.params.get("tls", "preferred")
        if tls == "false":
            kwargs["ssl_disabled"] = True
        elif tls == "true":
            kwargs["ssl"] = ssl.create_default_context()
        elif tls == "skip-verify":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            kwargs["ssl"] = context
        return kwargs

    @property
    def connect_timeout(self) -> float | None:
        """The ``timeout`` parameter of the dsn in seconds, if it has one."""
        value = self.params.get("timeout")
        return parse_duration(value) if value is not None else None

    def describe(self) -> str:
        """Return the dsn for logs: user, address and database, never the password."""
        where = f"unix({self.unix_socket})" if self.unix_socket else f"{self.host}:{self.port}"
        return f"{self.user or ''}@{where}/{self.database or ''}"


@dataclass(frozen=True)
class SqliteDsn:
    """Which SQLite database to open: a ``file:`` URI (opened with ``uri=True``) or ``:memory:``."""

    target: str

    def describe(self) -> str:
        """Return the database for logs and error messages."""
        return self.target


def parse_dsn(driver: str, dsn: str) -> MysqlDsn | SqliteDsn:
    """Return the parsed dsn of ``driver``; raises DsnError with an example of the right form."""
    if driver == "mysql":
        return parse_mysql_dsn(dsn)
    if driver == "sqlite":
        return parse_sqlite_dsn(dsn)
    raise ValueError(f"unknown driver {driver!r}")


def parse_mysql_dsn(dsn: str) -> MysqlDsn:
    """Parse a MySQL dsn in the Go form ``user:pass@tcp(host:port)/db?k=v`` or as ``mysql://`` URL."""
    text = dsn.strip()
    if not text:
        raise DsnError("mysql", "it is empty")
    if _URL.match(text):
        return _parse_mysql_url(text)
    return _parse_mysql_go(text)


def _parse_mysql_go(text: str) -> MysqlDsn:
    match = _GO_DSN.fullmatch(text)
    if not match:
        reason = "no '/' before the database name" if "/" not in text else _BAD_ADDRESS
        raise DsnError("mysql", reason)
    net, addr = match["net"], match["addr"]
    user, _, password = (match["userinfo"] or "").partition(":")
    host, port, unix_socket = "127.0.0.1", DEFAULT_PORT, None
    if net == "unix":
        if not addr:
            raise DsnError("mysql", "unix() needs the socket's path")
        unix_socket = addr
    elif net in ("tcp", None):
        if addr:
            host, port = _host_port(addr)
    else:
        raise DsnError("mysql", f"unknown network '{net}', use tcp or unix")
    params = _mysql_params(match["query"] or "")
    unix_socket = params.pop("unix_socket", None) or unix_socket
    return MysqlDsn(user or None, password, host, port, unix_socket, match["db"] or None, params)


def _host_port(addr: str) -> tuple[str, int]:
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    elif addr.count(":") == 1:
        host, _, port_text = addr.partition(":")
    else:
        host, port_text = addr, ""
    if not host:
        raise DsnError("mysql", "the address has no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DsnError("mysql", "the port must be a number from 1 to 65535")
    return host, int(port_text)


def _parse_mysql_url(text: str) -> MysqlDsn:
    try:
        url = urlsplit(text)
        port = url.port or DEFAULT_PORT
    except ValueError:
        raise DsnError("mysql", "the port must be a number from 1 to 65535") from None
    if url.scheme.lower() not in _MYSQL_SCHEMES:
        raise DsnError("mysql", f"unknown scheme '{url.scheme}', use mysql://")
    params = _mysql_params(url.query)
    unix_socket = params.pop("unix_socket", None)
    if not url.hostname and not unix_socket:
        raise DsnError("mysql", "the URL has no host")
    database = unquote(url.path.lstrip("/")) or None
    if database and "/" in database:
        raise DsnError("mysql", "the database name cannot hold '/'")
    user = unquote(url.username) if url.username else None
    password = unquote(url.password) if url.password else ""
    return MysqlDsn(user, password, url.hostname or "127.0.0.1", port, unix_socket, database, params)


def _mysql_params(query: str) -> dict[str, str]:
    params = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    for name, value in params.items():
        if name not in MYSQL_PARAMS:
            raise DsnError("mysql", f"unknown parameter '{name}'; known: {', '.join(MYSQL_PARAMS)}")
        if name == "charset" and charset_by_name(value) is None:
            raise DsnError("mysql", f"unknown charset '{value}'")
        if name == "tls" and value not in TLS_MODES:
            raise DsnError("mysql", f"tls must be one of {', '.join(TLS_MODES)}")
        if name == "timeout":
            try:
                parse_duration(value)
            except ValueError:
                raise DsnError("mysql", "timeout must be a duration such as 5s") from None
    return params


def parse_sqlite_dsn(dsn: str) -> SqliteDsn:
    """Parse a SQLite dsn: ``:memory:``, a file path, ``sqlite:///path[?mode=ro]`` or a ``file:`` URI.

    A database file must exist unless the dsn says ``mode=rwc``: a typing mistake in a path must not
    create an empty database.
    """
    text = dsn.strip()
    if not text:
        raise DsnError("sqlite", "it is empty")
    if text == ":memory:" or text.startswith("file:"):
        return SqliteDsn(text)
    if not _URL.match(text):
        return SqliteDsn(f"{Path(text).absolute().as_uri()}?mode=rw")
    scheme, _, rest = text.partition("://")
    if scheme.lower() != "sqlite":
        raise DsnError("sqlite", f"unknown scheme '{scheme}', use sqlite:///")
    path, _, query = rest.partition("?")
    if not path.startswith("/"):
        raise DsnError("sqlite", "a sqlite:// URL needs an absolute path after it (three slashes)")
    params = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    for name, value in params.items():
        allowed = SQLITE_PARAMS.get(name)
        if allowed is None:
            raise DsnError("sqlite", f"unknown parameter '{name}'; known: {', '.join(SQLITE_PARAMS)}")
        if value not in allowed:
            raise DsnError("sqlite", f"{name} must be one of {', '.join(allowed)}")
    params.setdefault("mode", "rw")
    path = "/" + unquote(path).lstrip("/")
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return SqliteDsn(f"file:{quote(path)}?{query}")
