"""Cron expressions in a timezone: validation, the next fire time, and the plan of a pass after a pause.

Times go in and come out as aware UTC datetimes; the expression is evaluated in the schedule's timezone
(croniter handles daylight-saving changes: a time skipped in spring fires at the first valid minute after).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from app.errors import Unprocessable

FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
SECONDS_FIELD_NAMES = ("second", *FIELD_NAMES)
WRONG_FIELD_COUNT = "the cron expression '{cron}' has {count} field{s}; give 5 ({fields})"
SECONDS_ALLOWED = ", or 6 with the seconds first"
INVALID_FIELD = "the cron expression '{cron}' is invalid: its {name} field '{value}' is not valid{detail}"
NEVER_FIRES = "the cron expression '{cron}' never fires (no date matches it)"
INVALID_TIMEZONE = "'{timezone}' is not an IANA timezone (for example 'UTC' or 'Europe/Berlin')"
MISSED_RECORDED = 100  # after a long pause, at most this many missed fire times are recorded one by one


def fields_of(cron: str) -> list[str]:
    """Return the whitespace-separated fields of an expression."""
    return cron.split()


def check_cron(cron: str, *, allow_seconds: bool) -> str:
    """Return the expression normalised (single spaces), or raise 422 ``invalid_cron`` saying what is wrong."""
    fields = fields_of(cron)
    if len(fields) != 5 and not (allow_seconds and len(fields) == 6):
        message = WRONG_FIELD_COUNT.format(
            cron=cron, count=len(fields), s="" if len(fields) == 1 else "s", fields=" ".join(FIELD_NAMES)
        )
        raise Unprocessable(message + (SECONDS_ALLOWED if allow_seconds else ""), code="invalid_cron")
    normalised = " ".join(fields)
    names = SECONDS_FIELD_NAMES if len(fields) == 6 else FIELD_NAMES
    for position, value in enumerate(fields):  # one field at a time, to name the one that is wrong
        alone = " ".join(value if i == position else "*" for i in range(len(fields)))
        if (problem := _problem(alone)) is not None:
            detail = f" ({problem})" if problem else ""
            raise Unprocessable(
                INVALID_FIELD.format(cron=normalised, name=names[position], value=value, detail=detail),
                code="invalid_cron",
            )
    if _problem(normalised) is not None:  # each field is valid alone, but no date matches them all
        raise Unprocessable(NEVER_FIRES.format(cron=normalised), code="invalid_cron")
    return normalised


def _problem(cron: str) -> str | None:
    """Return croniter's reason for refusing an expression ('' when it gives none), or None if it fires."""
    try:
        _iterator(cron, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterError as exc:
        text = re.sub(r"\[.*?\]|in field \d+|is not acceptable", "", str(exc))
        return " ".join(text.replace(" ,", ",").strip(" ,").split())
    return None


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
    truncated: bool = False  # more fire times were missed than are recorded one by one (a long pause)


def plan(cron: str, timezone: str, *, next_run_at: datetime, now: datetime, grace: float) -> Plan:
    """Decide a pass over a schedule whose ``next_run_at`` has come.

    Only the latest fire time at or before ``now`` may fire, and only if it is at most ``grace`` seconds old;
    every earlier one since ``next_run_at`` is missed (the scheduler was down or late). After a long pause
    the first missed time and the latest ``MISSED_RECORDED`` are recorded, and the plan says it is truncated.
    """
    following = next_after(cron, timezone, now)
    if next_run_at > now:
        return Plan(following=next_run_at)
    latest = previous_at_or_before(cron, timezone, now)
    if latest < next_run_at:  # next_run_at is not a fire time of this expression
        return Plan(following=following)
    earlier: list[datetime] = []
    iterator = _iterator(cron, latest.astimezone(ZoneInfo(timezone)))
    truncated = False
    while (moment := _utc(iterator.get_prev(datetime))) >= next_run_at:
        if len(earlier) == MISSED_RECORDED:
            truncated = True
            earlier.append(next_run_at)  # always recorded: two passes over one pause collide on it
            break
        earlier.append(moment)
    earlier.reverse()
    if (now - latest).total_seconds() <= grace:
        return Plan(missed=earlier, due=latest, following=following, truncated=truncated)
    return Plan(missed=[*earlier, latest], following=following, truncated=truncated)
