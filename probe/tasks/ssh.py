"""The ``ssh`` task type: upload a file and/or run a command on a remote host whose host key is verified.

Host keys are checked against a known_hosts file and unknown or changed keys are refused; nothing is ever
written to that file. A timeout or a cancel closes the connection after killing the remote command's process
group from a second channel, because sshd leaves a non-pty command running when its channel closes.
"""

# What comes from Fabric: the connection (``fabric.Connection`` with a Config that reads no ssh_config,
# Invoke or Fabric files), authentication (``connect_kwargs``), ``open()`` and the SFTP upload (``put``).
# What goes below it, to paramiko: the host keys, because Fabric's client adds unknown keys on its own
# (``trust_only`` replaces that on ``conn.client``); the TCP socket, opened here so that a cancel ends a slow
# connect (Fabric hands it on as ``connect_kwargs["sock"]``); and the command, run on a channel of
# ``conn.transport``, because ``conn.run()`` keeps all of the output in memory and waits as long as a
# background child holds it open, where this task keeps a bounded part and stops at its deadline or a cancel.

from __future__ import annotations

import errno
import getpass
import logging
import math
import os
import re
import select
import shlex
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fabric
import paramiko

from probe.errors import TaskError
from probe.process import ProcessResult, Sink
from probe.tasks._ssh_host_keys import known_hosts_name, trust_only
from probe.tasks.command import exit_outcome
from probe.tasktype import Option, Outcome, TaskContext, TaskType, register

log = logging.getLogger(__name__)

NOTHING_TO_DO = "give a command to run, an upload, or both"
EMPTY_COMMAND = "command is empty"
UPLOAD_SHAPE = "upload needs exactly two non-empty paths: {local: <file here>, remote: <path on the host>}"
PHRASE_WITHOUT_KEY = "key_passphrase is only used with key"
BAD_PORT = "port must be between 1 and 65535, got {port}"
BAD_ENV_NAME = "env name '{name}' is not a valid variable name (letters, digits and _, not starting with a digit)"
UNKNOWN_HOST_KEY = (
    "host key for {host} is not in {known_hosts}; add it (ssh-keyscan) or set insecure_ignore_host_key: true"
)
CHANGED_HOST_KEY = (
    "host key for {host} does not match the one in {known_hosts}: the server's key changed, or someone is "
    "intercepting the connection; if the change is expected, replace the entry (ssh-keygen -R, ssh-keyscan)"
)
HOST_KEY_NOT_VERIFIED = "WARNING: host key of {host}:{port} not verified (insecure_ignore_host_key)"
CONNECT_FAILED = "cannot connect to {host}:{port}: {reason}"
AUTH_FAILED = "authentication failed for {user}@{host}:{port} (tried {methods})"
SSH_FAILED = "SSH session with {host}:{port} failed: {reason}"
KEY_MISSING = "key file {path} does not exist"
KEY_ENCRYPTED = "key file {path} is encrypted: give key_passphrase"
KEY_UNREADABLE = "cannot load key file {path}: {reason}"
KNOWN_HOSTS_UNREADABLE = "cannot read known_hosts file {path}: {reason}"
LOCAL_MISSING = "upload: local file {path} does not exist"
UPLOAD_FAILED = "upload of {local} to {host}:{remote} failed: {reason}"
UPLOADED = "uploaded {local} to {host}:{remote} ({size} bytes)"
NO_EXIT_STATUS = "the remote command ended without an exit status (killed by a signal?)"

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
POLL = 0.02  # seconds between looks at an idle channel
PIPE_GRACE = 0.5  # how long output may stay open after the exit status (a background child holding it)
REAP_WAIT = 1.0  # how long an abort waits for the remote kill to run
# Runs on a second channel of the same connection: kill every process group that sshd started for this
# connection (each session's command leads its own group), except the reaper's own.
REAP_SCRIPT = (
    'command -v pgrep >/dev/null || exit 127; for p in $(pgrep -P "$PPID"); do '
    '[ "$p" = "$$" ] || kill -s KILL -- "-$p" 2>/dev/null; done; exit 0'
)
REAP_COMMAND = "exec /bin/sh -c " + shlex.quote(REAP_SCRIPT)


def remote_command(command: str, env: Mapping[str, Any] | None, workdir: str | None) -> str:
    """Return the command line sent to the remote shell, with ``env`` exported and ``workdir`` entered first.

    Values are quoted with shlex, so they reach the command as they are; this needs a POSIX login shell.
    """
    lines = []
    if env:
        lines.append("export " + " ".join(f"{name}={shlex.quote(str(value))}" for name, value in env.items()))
    if workdir:
        if workdir == "~" or workdir.startswith("~/"):
            target = "~/" + shlex.quote(workdir[2:]) if workdir[2:] else "~"
        else:
            target = shlex.quote(workdir)
        lines.append(f"cd {target} || exit")
    lines.append(command)
    return "\n".join(lines)


def load_key(path: str, passphrase: str | None) -> paramiko.PKey:
    """Load a private key (ed25519, ecdsa or rsa); raises TaskError saying what is wrong with it."""
    key_path = Path(path).expanduser()
    if not key_path.is_file():
        raise TaskError(KEY_MISSING.format(path=key_path))
    passwords = [None, passphrase.encode()] if passphrase else [None]
    error: Exception | None = None
    for password in passwords:  # an unencrypted key is read whether or not a passphrase is given
        try:
            return paramiko.PKey.from_path(key_path, password)
        except (TypeError, ValueError, OSError, paramiko.SSHException) as exc:
            error = exc
    if not passphrase and isinstance(error, TypeError) and "password" in str(error).lower():
        raise TaskError(KEY_ENCRYPTED.format(path=key_path))
    reason = "wrong key_passphrase, or not a private key" if passphrase else "not an ed25519, ecdsa or rsa private key"
    raise TaskError(KEY_UNREADABLE.format(path=key_path, reason=reason))


@register
class SSHTask(TaskType):
    """Upload a file with SFTP and/or run a command over SSH, the server's host key checked first."""

    name = "ssh"
    summary = "run a command and/or upload a file on a remote host over SSH"
    options = {
        "host": Option("string", required=True, help="the host name or address"),
        "port": Option("integer", default=22, help="the SSH port"),
        "user": Option("string", help="the remote user (default: the local user)"),
        "key": Option("string", help="path of a private key (~ expanded); tried before password"),
        "key_passphrase": Option("string", help="passphrase of an encrypted key"),
        "password": Option(
            "string",
            help="password (after the key, if both are given); without key and "
            "password the ssh agent and ~/.ssh/id_* keys are tried",
        ),
        "command": Option("string", help="command line run by the user's login shell"),
        "upload": Option("mapping", help="{local, remote}: a file copied with SFTP before the command runs"),
        "known_hosts": Option(
            "string", default=DEFAULT_KNOWN_HOSTS, help="known_hosts file the host key must be in (read, never written)"
        ),
        "insecure_ignore_host_key": Option(
            "boolean", default=False, help="skip host key verification (says so in the output)"
        ),
        "timeout": Option("duration", help="limit for connecting, uploading and running together"),
        "env": Option("mapping", help="variables exported for the command (quoted; needs a POSIX shell)"),
        "workdir": Option("string", help="directory the command runs in"),
    }

    def check(self, config: Mapping[str, Any]) -> list[str]:
        """Ask for a command or an upload, a well-formed upload, valid env names and a real port."""
        problems = []
        command, upload = config.get("command"), config.get("upload")
        if command is None and upload is None:
            problems.append(NOTHING_TO_DO)
        if command is not None and not command.strip():
            problems.append(EMPTY_COMMAND)
        if upload is not None and (
            set(upload) != {"local", "remote"}
            or not all(isinstance(upload[k], str) and upload[k] for k in ("local", "remote"))
        ):
            problems.append(UPLOAD_SHAPE)
        if config.get("key_passphrase") and not config.get("key"):
            problems.append(PHRASE_WITHOUT_KEY)
        port = config.get("port", 22)
        if not 1 <= port <= 65535:
            problems.append(BAD_PORT.format(port=port))
        for name in config.get("env") or {}:
            if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
                problems.append(BAD_ENV_NAME.format(name=name))
        return problems

    def run(self, config: dict[str, Any], ctx: TaskContext) -> Outcome:
        """Connect, upload the file if any, run the command if any; a non-zero exit fails the task."""
        session = _Session(config, ctx)
        unregister = ctx.on_abort(session.abort)
        try:
            return session.run()
        finally:
            unregister()
            session.close()


class _Session:
    """One task's SSH connection: what it did so far, and how to stop it from another thread."""

    def __init__(self, config: dict[str, Any], ctx: TaskContext) -> None:
        self.config = config
        self.ctx = ctx
        self.host: str = config["host"]
        self.port: int = config["port"]
        self.sock: socket.socket | None = None
        self.conn: fabric.Connection | None = None
        self.command_channel: paramiko.Channel | None = None
        self.lines: list[str] = []
        self.metrics: dict[str, Any] = {}

    def run(self) -> Outcome:
        """Do the task's work and return its outcome."""
        config, ctx = self.config, self.ctx
        upload = config.get("upload")
        local = Path(upload["local"]).expanduser() if upload else None
        if local is not None and not local.is_file():
            raise TaskError(LOCAL_MISSING.format(path=local))
        pkey = load_key(config["key"], config.get("key_passphrase")) if config.get("key") else None
        self.connect(pkey)
        if local is not None and upload is not None:
            self.upload(local, upload["remote"])
        if config.get("command") is None:
            ctx.check()
            return Outcome(True, "\n".join(self.lines) + "\n", metrics=self.metrics)
        line = remote_command(config["command"], config.get("env"), config.get("workdir"))
        result = self.execute(line)
        prefix = "".join(f"{text}\n" for text in self.lines)
        ctx.check(output=prefix + result.output, truncated_bytes=result.dropped)
        self.metrics["exit_code"] = result.exit_code
        outcome = exit_outcome(result.exit_code, prefix + result.output, result.stderr, [0], result.dropped)
        outcome.metrics = self.metrics
        if result.exit_code == -1:
            outcome.error = NO_EXIT_STATUS
        return outcome

    def fail(self, message: str) -> TaskError:
        """Return a TaskError keeping what was done so far; raises TaskStopped instead after an abort."""
        self.ctx.check()
        return TaskError(message, output="\n".join(self.lines), metrics=self.metrics)

    def connect(self, pkey: paramiko.PKey | None) -> None:
        """Open the TCP connection, then the Fabric connection on it: verify the host key and authenticate."""
        config, ctx = self.config, self.ctx
        insecure = config["insecure_ignore_host_key"]
        known_hosts = Path(config["known_hosts"]).expanduser()
        where = known_hosts_name(self.host, self.port)
        if insecure:
            self.lines.append(HOST_KEY_NOT_VERIFIED.format(host=self.host, port=self.port))
            ctx.log(self.lines[-1], "warning")
        self.sock = sock = self.open_socket()
        user = config.get("user") or getpass.getuser()
        password = config.get("password")
        agent = pkey is None and password is None
        wait = max(ctx.remaining(), 0.1)
        connect_kwargs = {
            "sock": sock,
            "pkey": pkey,
            "password": password,
            "allow_agent": agent,
            "look_for_keys": agent,
            "banner_timeout": wait,
            "auth_timeout": wait,
            "channel_timeout": wait,
        }
        # Fabric rounds connect_timeout down to whole seconds, and 0 would mean none; the abort still comes on time.
        self.conn = conn = fabric.Connection(
            self.host,
            user=user,
            port=self.port,
            config=fabric_config(),
            connect_timeout=math.ceil(wait),
            connect_kwargs=connect_kwargs,
        )
        unknown = UNKNOWN_HOST_KEY.format(host=where, known_hosts=known_hosts)
        try:
            trust_only(conn.client, None if insecure else known_hosts, unknown)
        except OSError as exc:
            raise TaskError(KNOWN_HOSTS_UNREADABLE.format(path=known_hosts, reason=exc.strerror)) from exc
        ctx.check()  # an abort before self.conn was set could not close it
        try:
            conn.open()
        except paramiko.BadHostKeyException:
            raise self.fail(CHANGED_HOST_KEY.format(host=where, known_hosts=known_hosts)) from None
        except paramiko.AuthenticationException:
            methods = [m for m, used in (("key " + str(config.get("key")), pkey), ("password", password)) if used]
            tried = " and ".join(methods) or "the ssh agent and default keys"
            raise self.fail(AUTH_FAILED.format(user=user, host=self.host, port=self.port, methods=tried)) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            reason = str(exc) or type(exc).__name__
            raise self.fail(SSH_FAILED.format(host=self.host, port=self.port, reason=reason)) from None
        log.debug("ssh task %s connected to %s:%s", ctx.task, self.host, self.port)

    def open_socket(self) -> socket.socket:
        """Connect to the host's port, giving up at the deadline or when the task is stopped."""
        try:
            addresses = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise self.fail(CONNECT_FAILED.format(host=self.host, port=self.port, reason=exc.strerror)) from None
        error = 0
        for family, kind, proto, _, address in addresses:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            error = sock.connect_ex(address)
            while error in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
                if self.ctx.stop.is_set() or self.ctx.remaining() <= 0:
                    error = errno.ETIMEDOUT
                    break
                _, writable, _ = select.select([], [sock], [], min(0.1, self.ctx.remaining()))
                if writable:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error == 0:
                sock.setblocking(True)
                return sock
            sock.close()
        reason = os.strerror(error).lower() if error else "no address"
        raise self.fail(CONNECT_FAILED.format(host=self.host, port=self.port, reason=reason))

    def upload(self, local: Path, remote: str) -> None:
        """Copy the local file to the host with SFTP; into a directory (or a path ending in /) under its name."""
        assert self.conn is not None
        if remote.endswith("/"):
            remote += local.name
        if remote.startswith("~/"):
            remote = remote[2:]  # SFTP starts in the home directory and does not expand ~
        try:
            self.conn.sftp()  # started here to tell a server without SFTP from a failed copy
        except (OSError, EOFError, paramiko.SSHException) as exc:
            reason = f"the server did not start SFTP ({exc or type(exc).__name__})"
            raise self.fail(UPLOAD_FAILED.format(local=local, host=self.host, remote=remote, reason=reason)) from None
        try:
            remote = self.conn.put(str(local), remote, preserve_mode=False).remote
            size = self.conn.sftp().stat(remote).st_size or 0
        except (OSError, EOFError, paramiko.SSHException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise self.fail(UPLOAD_FAILED.format(local=local, host=self.host, remote=remote, reason=reason)) from None
        self.metrics["bytes_uploaded"] = size
        self.lines.append(UPLOADED.format(local=local, host=self.host, remote=remote, size=size))
        self.ctx.log(self.lines[-1])

    def execute(self, line: str) -> ProcessResult:
        """Run one command line and read its output, each stream kept up to the output limit."""
        assert self.conn is not None and self.conn.transport is not None
        try:
            channel = self.conn.transport.open_session(timeout=max(self.ctx.remaining(), 0.1))
            self.command_channel = channel
            channel.exec_command(line)
            channel.shutdown_write()  # no input: a command that reads stdin sees its end at once
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self.fail(SSH_FAILED.format(host=self.host, port=self.port, reason=exc)) from None
        out, err = Sink(self.ctx.output_limit), Sink(self.ctx.output_limit)
        exited_at: float | None = None
        while True:
            idle = True
            if channel.recv_ready():
                out.feed(channel.recv(65536))
                idle = False
            if channel.recv_stderr_ready():
                err.feed(channel.recv_stderr(65536))
                idle = False
            if not idle:
                continue
            if channel.closed or (channel.eof_received and channel.exit_status_ready()):
                break
            if exited_at is None and channel.exit_status_ready():
                exited_at = time.monotonic()
            elif exited_at is not None and time.monotonic() - exited_at > PIPE_GRACE:
                break  # the command exited; something it left in the background still holds the output
            time.sleep(POLL)
        code = channel.recv_exit_status()
        channel.close()
        self.command_channel = None
        return ProcessResult(code, out.text(), err.text(), out.dropped + err.dropped)

    def abort(self) -> None:
        """Stop the work from another thread: kill the remote command, then close the connection."""
        channel, conn = self.command_channel, self.conn
        if channel is not None and conn is not None and conn.transport is not None and not channel.closed:
            self.reap(conn.transport)
        self.close()

    def reap(self, transport: paramiko.Transport) -> None:
        """Kill the process groups of this connection's remote commands, from a second channel."""
        try:
            reaper = transport.open_session(timeout=REAP_WAIT)
            reaper.exec_command(REAP_COMMAND)
            if not reaper.status_event.wait(REAP_WAIT) or reaper.recv_exit_status() != 0:
                raise paramiko.SSHException("the kill command did not succeed (needs /bin/sh and pgrep)")
        except Exception as exc:
            log.warning("could not kill the remote command on %s:%s: %s", self.host, self.port, exc)
            self.ctx.log(f"the remote command on {self.host} may still be running: {exc}", "warning")

    def close(self) -> None:
        """Close the connection (safe to call twice, from any thread)."""
        if self.conn is not None:
            self.conn.close()  # SFTP and the transport, once open() has returned
            self.conn.client.close()  # a handshake still in progress
        if self.sock is not None:
            self.sock.close()


def fabric_config() -> fabric.Config:
    """Return a Fabric config of its defaults alone: no ssh_config, Invoke or Fabric file is read.

    ``lazy`` skips the /etc and ~ config files; ``load_ssh_configs`` keeps ssh_config out even if
    ``load_ssh_config()`` runs later. No gateway and no agent forwarding.
    """
    overrides = {"load_ssh_configs": False, "ssh_config_path": None, "gateway": None, "forward_agent": False}
    return fabric.Config(overrides=overrides, runtime_ssh_path=None, lazy=True)
