"""How much does the probe engine add to running N trivial commands, next to bare subprocess and Ansible?

    .venv/bin/python bench/probe_overhead.py [--tasks N] [--repeat R] [--skip-ansible]

Times, in one run and interleaved round by round: N ``subprocess.run(["true"])`` calls, a workflow of N
``command: true`` tasks run in-process with ``probe.run_workflow`` and through the ``probe run`` CLI, and
``ansible-playbook`` with N ``command: /bin/true`` tasks on localhost. ansible-core is installed on first use
into its own virtualenv (.bench-venv/ansible), never into the project's. Prints medians and the ratios the
targets are judged on; exits 0 whether or not the targets are met, non-zero only when something fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import probe

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_VENV = ROOT / ".bench-venv" / "ansible"
BARE_TARGET = 1.3  # probe in-process at most this many times the bare subprocess time
ANSIBLE_TARGET = 20.0  # ansible-playbook at least this many times the probe CLI time


class BenchError(Exception):
    """Raised when a measured run fails, so its time would mean nothing."""


def note(message: str) -> None:
    """Tell what the benchmark is doing, on stderr so the figures on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)


def timed(run: Callable[[], None]) -> float:
    """Return the wall time of ``run()`` in seconds."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def workflow_text(tasks: int) -> str:
    """A workflow of ``tasks`` tasks that each run ``true`` without a shell."""
    lines = ["name: overhead", "tasks:"]
    for i in range(tasks):
        lines += [f"  - name: t{i}", "    type: command", '    config: {command: "true"}']
    return "\n".join(lines) + "\n"


def playbook_text(tasks: int) -> str:
    """An Ansible play of ``tasks`` ``command: /bin/true`` tasks on localhost."""
    lines = ["- hosts: localhost", "  connection: local", "  gather_facts: false", "  tasks:"]
    for i in range(tasks):
        lines += [f"    - name: t{i}", "      command: /bin/true"]
    return "\n".join(lines) + "\n"


def run_bare(tasks: int) -> None:
    """The floor: start ``true`` ``tasks`` times, one after the other."""
    for _ in range(tasks):
        subprocess.run(["true"], check=True)


def run_in_process(workflow: probe.Workflow) -> Callable[[], None]:
    """Return a callable that runs ``workflow`` in this process and fails loudly if it did not succeed."""

    def run() -> None:
        result = probe.run_workflow(workflow)
        if not result.success or len(result.tasks) != len(workflow.tasks):
            raise BenchError(f"probe.run_workflow did not succeed: {result.status.value} {result.error}")

    return run


def run_command(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Callable[[], None]:
    """Return a callable that runs ``argv`` with its output discarded and fails loudly on a non-zero exit."""

    def run() -> None:
        code = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        ).returncode
        if code != 0:
            raise BenchError(f"{' '.join(argv)} exited {code}")

    return run


def probe_cli() -> Path:
    """The ``probe`` script installed beside the running interpreter."""
    cli = Path(sys.executable).parent / "probe"
    if not cli.exists():
        raise BenchError(f"{cli} not found: run this with the project's venv, .venv/bin/python")
    return cli


def ensure_ansible() -> Path:
    """Return the ansible-playbook of the bench's own venv, creating the venv and installing it when missing."""
    playbook = ANSIBLE_VENV / "bin" / "ansible-playbook"
    if playbook.exists():
        return playbook
    python = getattr(sys, "_base_executable", sys.executable)
    try:
        if not (ANSIBLE_VENV / "bin" / "python").exists():
            note(f"creating a virtualenv for ansible-core at {ANSIBLE_VENV} with {python} (one-off)")
            subprocess.run([python, "-m", "venv", str(ANSIBLE_VENV)], check=True)
        note(f"installing ansible-core into {ANSIBLE_VENV} with pip (one-off, about a minute)")
        subprocess.run(
            [
                str(ANSIBLE_VENV / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "ansible-core",
            ],
            check=True,
            stdout=sys.stderr,
        )
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"installing ansible-core failed: {exc}") from exc
    if not playbook.exists():
        raise BenchError(f"pip finished but {playbook} is missing")
    return playbook


def ansible_env(home: Path) -> dict[str, str]:
    """The environment for ansible-playbook: quiet, no retry files or host-key prompts, state kept in ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        {
            "ANSIBLE_HOME": str(home),
            "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_RETRY_FILES_ENABLED": "False",
            "ANSIBLE_HOST_KEY_CHECKING": "False",
            "ANSIBLE_FORKS": "1",
            "ANSIBLE_PIPELINING": "True",  # Ansible's own advice for speed: give it its best ordinary setting
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_DEPRECATION_WARNINGS": "False",
            "ANSIBLE_LOCALHOST_WARNING": "False",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False",
        }
    )
    return env


def ansible_version(playbook: Path) -> str:
    """The first line of ``ansible-playbook --version``."""
    out = subprocess.run([str(playbook), "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


def check_ansible(argv: list[str], cwd: Path, env: dict[str, str], tasks: int) -> None:
    """One untimed run (it also compiles Ansible's bytecode) whose recap must show every task ran."""
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or f"ok={tasks} " not in done.stdout:
        tail = (done.stdout + done.stderr)[-2000:]
        raise BenchError(f"ansible-playbook did not run {tasks} tasks (exit {done.returncode}):\n{tail}")


def machine() -> str:
    """One line naming the machine: cores, CPU model, Python, date."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    today = datetime.date.today().isoformat()
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, {platform.system()}, {today}"


def verdict(ok: bool) -> str:
    """PASS or MISS."""
    return "PASS" if ok else "MISS"


def report(tasks: int, times: dict[str, list[float]], ansible: str | None) -> None:
    """Print the table of medians, per-task cost and ratios, and the verdict on each target."""
    median = {name: statistics.median(values) for name, values in times.items()}
    bare = median["bare"]
    rows = [("bare subprocess.run", "bare"), ("probe in-process", "probe"), ("probe run CLI", "cli")]
    if "ansible" in median:
        rows.append(("ansible-playbook", "ansible"))
    print(f"\n{tasks} tasks; median of the runs; ratios of medians measured in this run")
    print(f"{'':<22}{'runs':>5}{'median s':>10}{'min s':>9}{'ms/task':>9}{'x bare':>8}  target")
    for label, key in rows:
        values = times[key]
        target = ""
        if key == "probe":
            target = f"<= {BARE_TARGET}x bare: {verdict(median[key] / bare <= BARE_TARGET)}"
        elif key == "ansible":
            speedup = median[key] / median["cli"]
            target = f"{speedup:.1f}x probe CLI (>= {ANSIBLE_TARGET:.0f}x): {verdict(speedup >= ANSIBLE_TARGET)}"
        line = (
            f"{label:<22}{len(values):>5}{median[key]:>10.3f}{min(values):>9.3f}"
            f"{median[key] / tasks * 1000:>9.2f}{median[key] / bare:>8.2f}  {target}"
        )
        print(line.rstrip())
    startup = median["cli"] - median["probe"]
    print(f"\nprobe CLI start-up and loading the file (CLI minus in-process): {startup * 1000:.0f} ms")
    if ansible is not None:
        print(f"ansible/probe in-process: {median['ansible'] / median['probe']:.1f}x ({ansible})")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, metavar="N", help="tasks per run (default 200)")
    parser.add_argument(
        "--repeat", type=int, metavar="R", help="timed runs of each (default 5 for probe and bare, 3 for ansible)"
    )
    parser.add_argument("--skip-ansible", action="store_true", help="do not install or time ansible-playbook")
    args = parser.parse_args(argv)
    if args.tasks < 1 or (args.repeat is not None and args.repeat < 1):
        parser.error("--tasks and --repeat must be at least 1")
    repeat = args.repeat or 5
    ansible_repeat = args.repeat or 3
    try:
        return bench(args.tasks, repeat, ansible_repeat, args.skip_ansible)
    except BenchError as exc:
        print(f"probe_overhead: {exc}", file=sys.stderr)
        return 1


def bench(tasks: int, repeat: int, ansible_repeat: int, skip_ansible: bool) -> int:
    """Measure everything, interleaving bare, in-process and CLI runs round by round."""
    print(f"machine: {machine()}")
    cli = probe_cli()
    playbook = None if skip_ansible else ensure_ansible()
    with tempfile.TemporaryDirectory(prefix="probe-overhead-") as tmp:
        work = Path(tmp)
        (work / "workflow.yaml").write_text(workflow_text(tasks))
        workflow = probe.load_workflow(str(work / "workflow.yaml"))
        runners = {
            "bare": lambda: run_bare(tasks),
            "probe": run_in_process(workflow),
            "cli": run_command([str(cli), "run", "workflow.yaml", "-q"], work),
        }
        note("warming up (one untimed run of each)")
        for run in runners.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for round_ in range(repeat):
            note(f"round {round_ + 1}/{repeat}: bare, probe in-process, probe CLI")
            for name, run in runners.items():
                times[name].append(timed(run))
        version = None
        if playbook is not None:
            version = ansible_version(playbook)
            (work / "playbook.yml").write_text(playbook_text(tasks))
            python = ANSIBLE_VENV / "bin" / "python"
            (work / "inventory").write_text(f"localhost ansible_connection=local ansible_python_interpreter={python}\n")
            env = ansible_env(work / "ansible-home")
            argv = [str(playbook), "-i", "inventory", "playbook.yml"]
            note("ansible-playbook: one untimed run to check it runs every task")
            check_ansible(argv, work, env, tasks)
            run = run_command(argv, work, env)
            times["ansible"] = []
            for round_ in range(ansible_repeat):
                note(f"ansible round {round_ + 1}/{ansible_repeat}")
                times["ansible"].append(timed(run))
                # The probe CLI again beside each ansible run, so their ratio comes from the same minutes.
                times["cli"].append(timed(runners["cli"]))
    report(tasks, times, version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
