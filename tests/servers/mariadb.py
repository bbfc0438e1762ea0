"""The `mariadb_server` fixture: Debian's mariadbd on a throwaway data directory, loopback only."""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from tests.servers._util import ServerProcess, find_binary, free_port, run_checked

APT_PACKAGE = "mariadb-server"
_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")

# Small and fast: nothing here has to survive a power cut, only a clean restart.
_SERVER_OPTIONS = (
    "--skip-log-bin",
    "--skip-name-resolve",
    "--performance-schema=OFF",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-doublewrite=0",
    "--innodb-use-native-aio=0",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_unicode_ci",
    "--max-connections=500",
)


class MariaDBServer:
    """A MariaDB server with an application user that owns an empty database, plus an admin account."""

    host = "127.0.0.1"
    user = "automation"
    password = "automation-pw"
    database = "automation"
    root_user = "root"
    root_password = "root-pw"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port if port is not None else free_port(self.host)
        self.datadir = directory / "data"
        self.socket = str(directory / "mariadbd.sock")
        self.log_path = directory / "mariadbd.log"
        self._process = ServerProcess("mariadbd", self.log_path)
        self._bootstrapped = False

    @property
    def url(self) -> str:
        """Return the SQLAlchemy URL of the application database."""
        return self.url_for(self.database)

    @property
    def go_dsn(self) -> str:
        """Return the Go driver DSN of the application database."""
        return self.go_dsn_for(self.database)

    def url_for(self, database: str) -> str:
        """Return the SQLAlchemy URL of another database, as the application user."""
        return f"mysql+pymysql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def go_dsn_for(self, database: str) -> str:
        """Return the Go driver DSN of another database, as the application user."""
        return f"{self.user}:{self.password}@tcp({self.host}:{self.port})/{database}"

    @property
    def running(self) -> bool:
        """Tell whether the server process is alive."""
        return self._process.running

    def connect(self, **kwargs: Any) -> pymysql.connections.Connection:
        """Return a pymysql connection over TCP as the application user; keywords override defaults."""
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": self.database,
            "charset": "utf8mb4",
            "connect_timeout": 5,
        }
        options.update(kwargs)
        return pymysql.connect(**options)

    def connect_as_root(self, **kwargs: Any) -> pymysql.connections.Connection:
        """Return a pymysql connection over TCP as the admin account, with no default database."""
        return self.connect(user=self.root_user, password=self.root_password, database=None, **kwargs)

    def fresh_database(self, name: str | None = None) -> str:
        """Create an empty database (dropping one of that name) that the application user owns."""
        name = name or f"test_{secrets.token_hex(4)}"
        if not _NAME.match(name):
            raise ValueError(f"database name must match {_NAME.pattern}: {name!r}")
        with self.connect_as_root(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}`")
            cur.execute(f"GRANT ALL PRIVILEGES ON `{name}`.* TO %s@'%%'", (self.user,))
        return name

    def start(self) -> None:
        """Start the server (again) on the same port and data directory; do nothing if it runs."""
        if self.running:
            return
        mariadbd = find_binary("mariadbd", APT_PACKAGE)
        self.directory.mkdir(parents=True, exist_ok=True)  # its log, socket and data go there
        as_root = ["--user=root"] if os.geteuid() == 0 else []
        if not self.datadir.exists():
            install_db = find_binary("mariadb-install-db", APT_PACKAGE)
            argv = [install_db, "--no-defaults", *as_root, f"--datadir={self.datadir}"]
            argv += ["--auth-root-authentication-method=normal", "--skip-test-db", *_SERVER_OPTIONS]
            run_checked(argv, self.log_path, "mariadb-install-db")
        argv = [mariadbd, "--no-defaults", *as_root, f"--datadir={self.datadir}", f"--tmpdir={self.directory}"]
        argv += [f"--socket={self.socket}", f"--port={self.port}", f"--bind-address={self.host}"]
        argv += [f"--pid-file={self.directory / 'mariadbd.pid'}", *_SERVER_OPTIONS]
        self._process.start(argv, ready=self._accepts_root, timeout=60)
        if not self._bootstrapped:
            self._bootstrap()
            self._bootstrapped = True

    def stop(self) -> None:
        """Shut the server down cleanly."""
        self._process.stop(timeout=60)

    def _accepts_root(self) -> bool:
        # root@localhost keeps an empty password: the socket lives in our own temporary directory.
        pymysql.connect(unix_socket=self.socket, user="root", password="", connect_timeout=2).close()
        return True

    def _bootstrap(self) -> None:
        conn = pymysql.connect(unix_socket=self.socket, user="root", password="", autocommit=True)
        with conn, conn.cursor() as cur:
            cur.execute("CREATE USER IF NOT EXISTS %s@'127.0.0.1'", (self.root_user,))
            cur.execute("ALTER USER %s@'127.0.0.1' IDENTIFIED BY %s", (self.root_user, self.root_password))
            cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@'127.0.0.1' WITH GRANT OPTION", (self.root_user,))
            cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (self.user, self.password))
            cur.execute(f"CREATE DATABASE `{self.database}`")
            cur.execute(f"GRANT ALL PRIVILEGES ON `{self.database}`.* TO %s@'%%'", (self.user,))


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    """Yield a MariaDB server shared by the session; tests using it are marked `mariadb`."""
    server = MariaDBServer(tmp_path_factory.mktemp("mariadb"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.datadir, ignore_errors=True)  # large; the log stays
