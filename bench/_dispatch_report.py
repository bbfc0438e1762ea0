"""What ``bench/dispatch.py`` prints: the latency, throughput and CPU tables, with the verdicts against its targets."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

from probe_overhead import verdict

LATENCY_TARGET_MS = 50.0  # p95 of POST returned -> claimed
RATE_TARGET = 0.20  # platform jobs/s at least this share of bare Celery tasks/s


Ticks = tuple[int, int] | None  # the machine's CPU time so far: (busy, total) clock ticks; None without /proc/stat


@dataclass(frozen=True)
class Phases:
    """One throughput round split where its last job was accepted (or its last bare task sent)."""

    submit: float  # seconds until the last job was accepted (the last bare task sent)
    done: float  # seconds until every job completed (every bare task ran)
    done_submitting: int  # jobs completed (bare tasks run) by the end of the first phase
    ticks: tuple[Ticks, Ticks, Ticks]  # machine_ticks() at the round's start, at the split, at its end

    @property
    def busy_submitting(self) -> float | None:
        """The machine's busy share in the first phase."""
        return busy_share(self.ticks[0], self.ticks[1])

    @property
    def busy_after(self) -> float | None:
        """The machine's busy share in the second phase."""
        return busy_share(self.ticks[1], self.ticks[2])

    @property
    def busy(self) -> float | None:
        """The machine's busy share over the whole round."""
        return busy_share(self.ticks[0], self.ticks[2])


def machine_ticks() -> Ticks:
    """The whole machine's CPU time so far, in clock ticks: (busy, total); None where /proc/stat is missing.

    Busy is every state but idle and iowait (``guest`` is counted inside ``user`` already, so it is left out).
    """
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def busy_share(before: Ticks, after: Ticks) -> float | None:
    """The share of the machine's CPU time (every core, every process) that was busy between two readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def ms_figures(values: list[float]) -> tuple[float, float, float]:
    """p50, p95 and max of ``values`` (seconds), in milliseconds."""
    ordered = sorted(values)
    if len(ordered) < 2:
        return ordered[0] * 1000, ordered[0] * 1000, ordered[0] * 1000
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return q[49] * 1000, q[94] * 1000, ordered[-1] * 1000


def report(
    latency: dict[str, list[float]],
    rates: dict[str, list[float]],
    cpu: dict[str, list[dict[str, float]]],
    phases: dict[str, list[Phases]],
    args: argparse.Namespace,
) -> None:
    """Print the tables and the verdicts."""
    n = len(latency["claim"])
    print(f"\nlatency at low load: one job at a time, {n} jobs, one agent; bare Celery: {n} tasks, one worker")
    print(f"{'':<44}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}  target")
    rows = [
        ("platform: POST returned -> agent's claim", "claim", True),
        ("bare Celery: send_task returned -> task runs", "run", False),
        ("platform: POST /api/v1/jobs round trip", "post", False),
        ("bare Celery: send_task call", "send", False),
        ("platform: POST returned -> job finished", "finish", False),
    ]
    for label, key, judged in rows:
        p50, p95, top = ms_figures(latency[key])
        target = f"p95 < {LATENCY_TARGET_MS:.0f} ms: {verdict(p95 < LATENCY_TARGET_MS)}" if judged else ""
        print(f"{label:<44}{len(latency[key]):>4}{p50:>9.1f}{p95:>9.1f}{top:>9.1f}  {target}".rstrip())
    claim50 = ms_figures(latency["claim"])[0]
    run50 = ms_figures(latency["run"])[0]
    print(f"claim p50 minus bare round trip p50: {claim50 - run50:.1f} ms")

    bare = statistics.median(rates["bare"])
    print(
        f"\nthroughput: {args.rounds} rounds; two agents (AGENT_CONCURRENCY {args.agent_concurrency}) "
        f"and two bare workers (-P threads -c {args.agent_concurrency}); the platform on {args.database}"
    )
    print(f"{'':<38}{'items':>6}{'median/s':>10}{'min/s':>8}{'max/s':>8}{'x bare':>8}  target")
    rows2 = [
        (f"platform: jobs completed ({args.clients} clients)", "platform", args.jobs),
        (f"platform, batches of {args.batch}: completed", "batched", args.jobs),
        ("bare Celery: no-op tasks run", "bare", args.bare_tasks),
        ("platform: POST /api/v1/jobs accepted", "submit", args.jobs),
        ("platform: jobs accepted in batches", "submit batched", args.jobs),
        ("bare Celery: send_task calls", "send", args.bare_tasks),
    ]
    for label, key, items in rows2:
        values = rates[key]
        median = statistics.median(values)
        target = ""
        if key in ("platform", "batched"):
            target = f">= {RATE_TARGET:.0%} of bare: {verdict(median / bare >= RATE_TARGET)}"
        print(
            f"{label:<38}{items:>6}{median:>10.1f}{min(values):>8.1f}{max(values):>8.1f}"
            f"{median / bare:>8.2f}  {target}".rstrip()
        )
    for key in ("platform", "batched"):
        ratios = [p / b for p, b in zip(rates[key], rates["bare"], strict=True)]
        print(f"{key}/bare per round: " + ", ".join(f"{r:.3f}" for r in ratios))

    groups = list(cpu["platform"][0])
    print("\nCPU ms per job (platform) or per task (bare), by process, median of the rounds")
    print(f"{'':<12}" + "".join(f"{group:>13}" for group in groups))
    for which in ("platform", "batched", "bare"):
        medians = [statistics.median(used[group] for used in cpu[which]) for group in groups]
        print(f"{which:<12}" + "".join(f"{value:>13.2f}" for value in medians))

    phase_table(phases, args)


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}"


def phase_table(phases: dict[str, list[Phases]], args: argparse.Namespace) -> None:
    """Where a round's time goes: until its last job was accepted, then until every job completed; how fast jobs
    completed in each phase, and how busy the machine was (all its cores, every process on it)."""
    print(
        "\nwhere the time goes, median of the rounds: until the last job is accepted (the last bare task sent), "
        "then until all are done;\ndone/s: jobs completed (bare tasks run) a second in that phase; busy: the "
        "machine's CPU time in use, every core and process"
    )
    columns = (("phase 1 s", 10), ("done/s", 8), ("busy %", 8), ("phase 2 s", 11), ("done/s", 8), ("busy %", 8))
    print(f"{'':<22}" + "".join(f"{name:>{width}}" for name, width in columns) + f"{'round busy %':>14}")
    labels = {"platform": "one job per POST", "batched": f"batches of {args.batch}", "bare": "bare Celery"}
    for which, label in labels.items():
        rounds = phases[which]
        items = args.bare_tasks if which == "bare" else args.jobs
        first = statistics.median(p.submit for p in rounds)
        second = statistics.median(p.done - p.submit for p in rounds)
        rate_first = statistics.median(p.done_submitting / p.submit for p in rounds)
        rate_second = statistics.median((items - p.done_submitting) / max(p.done - p.submit, 1e-9) for p in rounds)
        print(
            f"{label:<22}{first:>10.2f}{rate_first:>8.0f}{_percent(_median([p.busy_submitting for p in rounds])):>8}"
            f"{second:>11.2f}{rate_second:>8.0f}{_percent(_median([p.busy_after for p in rounds])):>8}"
            f"{_percent(_median([p.busy for p in rounds])):>14}"
        )
