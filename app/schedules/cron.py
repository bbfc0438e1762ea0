"""Cron expressions in a timezone: validation, the next fire time, and the plan of a pass after a pause.

Times go in and come out as aware UTC datetimes; the expression is evaluated in the schedule's timezone
(croniter handles daylight-saving changes: a time skipped in spring fires at the first valid minute after).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from app.errors import Unprocessable

CRON_FIELDS = "minute hour day-of-month month day-of-week"
WRONG_FIELD_COUNT = "the cron expression '{cron}' has {count} fields; give 5 ({fields})"
WRONG_FIELD_COUNT_SECONDS = "the cron expression '{cron}' has {count} fields; give 5 ({fields}), or 6 with seconds first"
INVALID_CRON = "the cron expression '{cron}' is invalid: {reason}"
NEVER_FIRES = "the cron expression '{cron}' never fires"
INVALID_TIMEZONE = "'{timezone}' is not an IANA timezone (for example 'UTC' or 'Europe/Berlin')"
MISSED_RECORDED = 100  # after a long pause, at most this many missed fire times are recorded one by one


def fields_of(cron: str) -> list[str]:
    """Return the whitespace-separated fields of an expression."""
    return cron.split()


def check_cron(cron: str, *, allow_seconds: bool) -> str:
    """Return the expression normalised (single spaces), or raise 422 ``invalid_cron`` saying what is wrong."""
    fields = fields_of(cron)
    if len(fields) != 5 and not (allow_seconds and len(fields) == 6):
        template = WRONG_FIELD_COUNT_SECONDS if allow_seconds else WRONG_FIELD_COUNT
        raise Unprocessable(template.format(cron=cron, count=len(fields), fields=CRON_FIELDS), code="invalid_cron")
    normalised = " ".join(fields)
    try:
        _iterator(normalised, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterError as exc:
        if "failed to find" in str(exc):
            raise Unprocessable(NEVER_FIRES.format(cron=normalised), code="invalid_cron") from None
        reason = str(exc).replace(f"[{normalised}] ", "")
        raise Unprocessable(INVALID_CRON.format(cron=normalised, reason=reason), code="invalid_cron") from None
    return normalised


def check_timezone(name: str) -> ZoneInfo:
    """Return the zone of an IANA name, or raise 422 ``invalid_timezone``."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: a malformed key such as '../x' or ''
        raise Unprocessable(INVALID_TIMEZONE.format(timezone=name), code="invalid_timezone") from None


def _iterator(cron: str, start: datetime) -> croniter:
    return croniter(cron, start, second_at_beginning=len(fields_of(cron)) == 6)


def next_after(cron: str, timezone: str, moment: datetime) -> datetime:
    """Return the first fire time strictly after ``moment`` (aware UTC)."""
    local = moment.astimezone(ZoneInfo(timezone))
    return _utc(_iterator(cron, local).get_next(datetime))


def previous_at_or_before(cron: str, timezone: str, moment: datetime) -> datetime:
    """Return the last fire time at or before ``moment`` (aware UTC)."""
    local = (moment + timedelta(microseconds=1)).astimezone(ZoneInfo(timezone))
    return _utc(_iterator(cron, local).get_prev(datetime))


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class Plan:
    """What one pass does with a due schedule: times recorded as missed, the time to fire, the next one."""

    missed: list[datetime] = field(default_factory=list)  # oldest first
    due: datetime | None = None  # the latest fire time, still within the misfire grace
    following: datetime | None = None  # the next fire time after now
    unrecorded: int = 0  # missed fire times not recorded one by one (a long pause)


def plan(cron: str, timezone: str, *, next_run_at: datetime, now: datetime, grace: float) -> Plan:
    """Decide a pass over a schedule whose ``next_run_at`` has come.

    Only the latest fire time at or before ``now`` may fire, and only if it is at most ``grace`` seconds old;
    every earlier one since ``next_run_at`` is missed (the scheduler was down or late). A long pause records
    ``next_run_at`` and the latest ``MISSED_RECORDED`` of them, and counts the rest.
    """
    following = next_after(cron, timezone, now)
    if next_run_at > now:
        return Plan(following=next_run_at)
    latest = previous_at_or_before(cron, timezone, now)
    if latest < next_run_at:  # next_run_at is not a fire time of this expression (it was changed meanwhile)
        return Plan(following=following)
    earlier: list[datetime] = []
    iterator = _iterator(cron, latest.astimezone(ZoneInfo(timezone)))
    unrecorded = 0
    while True:
        moment = _utc(iterator.get_prev(datetime))
        if moment < next_run_at:
            break
        if len(earlier) >= MISSED_RECORDED:
            unrecorded = 1 + _count_between(cron, timezone, next_run_at, moment)
            break
        earlier.append(moment)
    earlier.reverse()
    if unrecorded:
        earlier[0:0] = [next_run_at]  # always record the first: two passes over one pause collide on it
        unrecorded -= 1
    if (now - latest).total_seconds() <= grace:
        return Plan(missed=earlier, due=latest, following=following, unrecorded=unrecorded)
    return Plan(missed=[*earlier, latest], following=following, unrecorded=unrecorded)


def _count_between(cron: str, timezone: str, start: datetime, end: datetime, limit: int = 1_000_000) -> int:
    """Count fire times in ``[start, end)``, up to ``limit`` (a bound on the work after a very long pause)."""
    iterator = _iterator(cron, (start - timedelta(microseconds=1)).astimezone(ZoneInfo(timezone)))
    count = 0
    while count < limit and _utc(iterator.get_next(datetime)) < end:
        count += 1
    return count
