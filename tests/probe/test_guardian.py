"""The guardian: the commands a process runs die with it, however it dies, and only those it has not finished."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.servers._util import wait_for

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX only: Windows keeps what it had"),
    pytest.mark.timeout(60),
]

ROOT = Path(__file__).resolve().parents[2]
# The command writes its shell's pid (its process group) and its background child's, then waits for both.
TWO_SLEEPS = "echo $$ > {dir}/pids; sleep 300 & echo $! >> {dir}/pids; sleep 300"


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: the container's init may never reap what it inherits)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pids_in(path: Path, count: int) -> list[int]:
    """Wait for ``count`` whole lines of pids in ``path`` and return them."""

    def written() -> bool:
        return path.exists() and path.read_text().count("\n") >= count

    assert wait_for(written, timeout=10), f"{path.name} was not written"
    return [int(line) for line in path.read_text().split()]


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``tests.probe.dying_runner`` with steps; at the end kill it and every process it recorded."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*steps: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "tests.probe.dying_runner", str(tmp_path), *steps]
        started.append(subprocess.Popen(argv, cwd=ROOT))
        return started[-1]

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
    for name in ("pids", "forked", "left"):  # what outlived a failed test: a command's group, or one process
        for pid in (tmp_path / name).read_text().split() if (tmp_path / name).exists() else []:
            for kill_one in (os.killpg, os.kill):
                with contextlib.suppress(ProcessLookupError):
                    kill_one(int(pid), signal.SIGKILL)


def registered(directory: Path, pgid: int) -> None:
    """Wait until the runner has told its guardian of the group ``pgid``: the command runs a moment before."""

    def told() -> bool:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return pgid in json.loads((directory / "watching").read_text())
        return False

    assert wait_for(told, timeout=10), f"the runner never registered group {pgid}"


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the runner, as the OOM killer would, and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_command_and_its_background_child_die_with_the_process_that_ran_it(runner, tmp_path):
    proc = runner(f"run:{TWO_SLEEPS.format(dir=tmp_path)}")
    pids = pids_in(tmp_path / "pids", 2)
    assert all(alive(pid) for pid in pids)
    registered(tmp_path, pids[0])
    kill(proc)
    assert wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5), "the command outlived its runner"


def test_a_command_started_after_the_guardian_was_killed_runs_and_dies_with_its_runner(runner, tmp_path):
    proc = runner("run:true", "kill-guardian", f"run:{TWO_SLEEPS.format(dir=tmp_path)}")
    pids = pids_in(tmp_path / "pids", 2)
    registered(tmp_path, pids[0])
    kill(proc)
    assert wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5), "no new guardian killed the command"


def test_a_forked_child_does_not_keep_the_guardian_from_seeing_its_parent_die(runner, tmp_path):
    proc = runner("run:true", "fork", f"run:{TWO_SLEEPS.format(dir=tmp_path)}")
    (forked,) = pids_in(tmp_path / "forked", 1)
    pids = pids_in(tmp_path / "pids", 2)
    registered(tmp_path, pids[0])
    kill(proc)
    assert alive(forked)
    assert wait_for(lambda: not any(alive(pid) for pid in pids), timeout=5), "the forked child kept the guardian's pipe"


def test_a_normal_run_leaves_nothing_registered_and_nothing_killed(runner, tmp_path):
    # The command ends normally and leaves a background process in its group: the group was reported done.
    proc = runner(f"run:sleep 300 >/dev/null 2>&1 & echo $! > {tmp_path}/left", "watched")
    assert wait_for((tmp_path / "done").exists, timeout=10)
    (left,) = pids_in(tmp_path / "left", 1)
    assert (tmp_path / "watched").read_text() == "[]"
    kill(proc)
    time.sleep(1)  # the guardian kills within milliseconds of its parent's death
    assert alive(left)


def ignored_signals(pid: int) -> set[signal.Signals]:
    """The signals ``pid`` ignores (Linux: its SigIgn mask)."""
    mask = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("SigIgn:"))
    bits = int(mask.split()[1], 16)
    return {sig for sig in signal.Signals if bits >> (sig - 1) & 1}


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_the_guardian_has_a_session_of_its_own_ignores_terminal_signals_and_holds_only_its_pipe(run_yaml):
    assert run_yaml("name: g\ntasks:\n  - {name: a, type: command, config: {command: 'true'}}\n").success
    (found,) = [p for p in psutil.Process().children() if "probe.guardian" in " ".join(p.cmdline())]
    assert os.getsid(found.pid) == found.pid
    terminal = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    assert wait_for(lambda: terminal <= ignored_signals(found.pid), timeout=10)  # once its first lines have run
    for sig in terminal:
        found.send_signal(sig)
    time.sleep(0.3)
    assert found.status() != psutil.STATUS_ZOMBIE
    assert sorted(os.listdir(f"/proc/{found.pid}/fd")) == ["0", "1", "2"]
    assert os.readlink(f"/proc/{found.pid}/fd/0").startswith("pipe:")
