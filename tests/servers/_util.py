"""Helpers shared by the server fixtures: free ports, binaries, and server processes that never leak."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NoReturn

import psutil

# Debian keeps daemons in sbin, which a non-root PATH often lacks.
_EXTRA_PATH = ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/local/bin", "/usr/bin", "/bin")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class ServerStartError(RuntimeError):
    """Raised when a test server does not come up; the message ends with the tail of its log."""


class MissingBinaryError(RuntimeError):
    """Raised when a server binary is not installed; the message names the apt package to install."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_open(host: str, port: int) -> bool:
    """Tell whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, *, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until host:port accepts connections; fail early if `process` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not port_is_open(host, port):
        if process is not None and process.poll() is not None:
            raise ServerStartError(f"process exited with code {process.returncode} before {host}:{port} opened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.05)


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return whether it held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def find_binary(name: str, apt_package: str) -> str:
    """Return the absolute path of `name`, or fail with the apt package that provides it."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_PATH])
    path = shutil.which(name, path=search)
    if path is None:
        raise MissingBinaryError(
            f"{name} is not installed: run `apt-get install -y {apt_package}` "
            f"(scripts/test installs it when run as root)"
        )
    return os.path.abspath(path)


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last `lines` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path} is empty)"


def run_checked(
    argv: Sequence[str], log_path: Path, what: str, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> None:
    """Run a setup command with its output appended to `log_path`; raise with the log tail on failure."""
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            timeout=timeout,
            env=None if env is None else dict(env),
        )
    if result.returncode != 0:
        raise ServerStartError(
            f"{what} failed with exit code {result.returncode}; tail of {log_path}:\n{log_tail(log_path)}"
        )


def _die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when pytest dies, so a killed run leaves no server behind."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Stop a process and every process it started: SIGTERM, then SIGKILL after `timeout` seconds."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    # Children that outlive their parent (for example an sshd session) are reaped here.
    for proc in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(children, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


class ServerProcess:
    """One long-running server subprocess with its log file, started until ready and stopped cleanly."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Tell whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(
        self,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool],
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start the server and wait until `ready()` holds; on failure stop it and raise with its log."""
        if self.running:
            return
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # only calls prctl, safe after fork
                env=None if env is None else dict(env),
            )
        deadline = time.monotonic() + timeout
        last_error = "the readiness check never passed"
        while True:
            if self._process.poll() is not None:
                self._fail(f"exited with code {self._process.returncode} while starting")
            try:
                if ready():
                    return
            except Exception as exc:  # the check fails in many ways while the server boots
                last_error = f"last readiness check: {type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                self._fail(f"was not ready after {timeout:.0f}s ({last_error})")
            time.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has ended by itself (None while it runs, or once stopped or killed)."""
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    def kill(self) -> None:
        """Kill the server and its children at once (SIGKILL), as a crash would."""
        if self._process is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self._process.pid).children(recursive=True):
                child.kill()
        self._process.kill()
        self._process.wait()
        self._process = None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and its children; do nothing if it is not running."""
        if self._process is not None:
            stop_process(self._process, timeout)
            self._process = None

    def _fail(self, reason: str) -> NoReturn:
        self.stop(timeout=5)
        raise ServerStartError(f"{self.name} {reason}; tail of {self.log_path}:\n{log_tail(self.log_path)}")
