"""Kill the commands a process still runs when that process dies, however it dies (SIGKILL, the OOM killer).

Commands start in sessions of their own, so nothing ties them to the life of the process that started them: an
agent killed while a command ran left the command running, and the platform then ran the job's next attempt
beside it. So on POSIX the first command a process starts also starts a guardian (once; again if it died): a
small Python process in a session of its own, where a terminal's Ctrl-C does not reach it, and which ignores
SIGINT, SIGTERM and SIGHUP. It reads a pipe whose only writer is this process: ``+<pgid>`` when a command's
process group starts, ``-<pgid>`` once this process is done with it. When the pipe ends, the kernel has closed
this process's files, so it is gone (or has exec'd, forgetting its commands): the guardian SIGKILLs every group
still registered, and exits.

PR_SET_PDEATHSIG would not do: it fires when the *thread* that started the child ends (an agent starts commands
from a pool of threads), only for the child itself and not the group, and only on Linux; and ``preexec_fn``, which
would be needed to set it, is unsafe in a process with threads.

Windows keeps what it has: a timeout or a cancel ends a command's tree with ``taskkill /T``, but a command outlives
a killed process there (a job object that kills on close would be the equivalent of this module).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

log = logging.getLogger(__name__)

# Run with -I -S: no site, no PYTHON* variables, no current directory on sys.path; only builtin modules.
# A write of a few bytes to a pipe is atomic, but a read may end inside a line: the rest waits for the next read.
# The first line names it in ps.
PROGRAM = """\
# probe.guardian: SIGKILLs the process groups of its parent's commands when the parent dies
import os, signal, time
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
groups, rest = set(), b""
while data := os.read(0, 65536):
    *lines, rest = (rest + data).split(b"\\n")
    for line in lines:
        (groups.add if line[:1] == b"+" else groups.discard)(int(line[1:]))
    time.sleep(0.1)  # read in batches: each wake-up costs the machine more than the two writes of a command
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""

NOT_STARTED = "commands will outlive this process if it is killed: their guardian could not be started (%s)"
EXITED = "the guardian of this process's commands exited (status %s); the next command starts another"


class _Guardian:
    """This process's guardian: the write end of its pipe, and the groups it has been told of."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.pipe: int | None = None
        self.groups: set[int] = set()
        self.warned = False

    def ensure(self) -> None:
        """Start the guardian unless it runs."""
        if self.proc is not None and self.proc.poll() is not None:
            self.gone()
        if self.proc is None:
            self.start()

    def tell(self, line: str) -> bool:
        """Write one line to the guardian; False when there is none or it has exited."""
        if self.proc is None or self.pipe is None:
            return False
        try:
            _write_all(self.pipe, line.encode())
        except OSError:  # BrokenPipeError: nothing holds the read end, so the guardian has exited
            self.gone()
            return False
        return True

    def gone(self) -> None:
        """Forget a guardian that has exited: close its pipe, reap it, and say so."""
        assert self.proc is not None and self.pipe is not None
        os.close(self.pipe)
        log.warning(EXITED, self.proc.wait())
        self.proc = self.pipe = None

    def start(self) -> None:
        """Start a guardian and tell it every group registered; warn (once) when it cannot be started."""
        try:
            self.proc, self.pipe = _spawn()
        except OSError as exc:
            if not self.warned:
                log.warning(NOT_STARTED, exc)
                self.warned = True
            return
        self.tell("".join(f"+{pgid}\n" for pgid in self.groups))


def _spawn() -> tuple[subprocess.Popen[bytes], int]:
    """Start the guardian's program; return it and the write end of its pipe.

    os.pipe's ends are not inheritable and commands start with ``close_fds``: the guardian gets the read end (as its
    stdin, and no other file of ours), and only this process holds the write end.
    """
    if not sys.executable:
        raise FileNotFoundError("Python does not know its own interpreter (sys.executable is empty)")
    read, write = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", PROGRAM],
            stdin=read,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",  # keeps no directory of ours busy
            start_new_session=True,
        )
    except OSError:
        os.close(write)
        raise
    finally:
        os.close(read)
    return proc, write


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


_guardian = _Guardian()


def start() -> None:
    """Start this process's guardian unless it runs: before a command starts, so that its ``watch`` waits for none."""
    with _guardian.lock:
        _guardian.ensure()


def watch(pgid: int) -> None:
    """Have the guardian kill the process group ``pgid`` should this process die (starting another if it died).

    A command started in the instant before this call outlives this process if it dies in that instant.
    """
    with _guardian.lock:
        _guardian.groups.add(pgid)
        if not _guardian.tell(f"+{pgid}\n"):
            _guardian.ensure()  # a new guardian is told every group, this one among them


def release(pgid: int) -> None:
    """Tell the guardian this process is done with the group ``pgid`` (its leader reaped): never kill it.

    PID reuse: the system reuses no ID while a process or a process group has it, and a group stays registered
    until this process has reaped its leader, so the guardian kills this command's group and no other. Once this
    process dies its unreaped leaders are reaped by init, and a group that had no other member frees its ID; but
    the guardian wakes as the dying process's files are closed and kills within milliseconds, and PIDs are handed
    out in turn: another group would have to take that ID after every other free PID was handed out meanwhile.
    The same holds for the instant between the reap and the ``-`` line.
    """
    with _guardian.lock:
        _guardian.groups.discard(pgid)
        _guardian.tell(f"-{pgid}\n")


def watched() -> frozenset[int]:
    """The process groups the guardian kills should this process die now."""
    with _guardian.lock:
        return frozenset(_guardian.groups)


def _forget_in_child() -> None:
    """In a forked child: close the inherited write end, so the guardian still sees its parent's death.

    The child runs none of its parent's commands; a command it starts starts a guardian of its own.
    """
    global _guardian
    if _guardian.pipe is not None:
        os.close(_guardian.pipe)
    _guardian = _Guardian()


if hasattr(os, "register_at_fork"):  # POSIX
    # Holding the lock across fork keeps a child from copying a guardian half started (a pipe not yet recorded).
    os.register_at_fork(
        before=lambda: _guardian.lock.acquire(),
        after_in_parent=lambda: _guardian.lock.release(),
        after_in_child=_forget_in_child,
    )
