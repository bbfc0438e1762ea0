"""Cron expressions in a timezone: validation, the next fire time, and the plan of a pass after a pause.

Times go in and come out as aware UTC datetimes; the expression is evaluated in the schedule's timezone
(croniter handles daylight-saving changes: a time skipped in spring fires at the first valid minute after).

Each field is checked here against the syntax docs/API.md documents before croniter sees it: croniter accepts
more and changes its meaning without a word (a reversed range ``1-0`` is ``*``, ``3-3`` is ``*`` too, ``*/61``
fires at minute 0 only, a random ``R`` is drawn again at every evaluation, so that a schedule never fires).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from app.errors import Unprocessable

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
NUMBER = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also takes '²' and '٣'

WRONG_FIELD_COUNT = "the cron expression '{cron}' has {count} field{s}; give 5 ({fields})"
SECONDS_ALLOWED = ", or 6 with the seconds first"
INVALID_FIELD = "the cron expression '{cron}' is invalid: its {name} field '{value}' is not valid ({problem})"
NEVER_FIRES = "the cron expression '{cron}' never fires (no date matches it)"
INVALID_TIMEZONE = "'{timezone}' is not an IANA timezone (for example 'UTC' or 'Europe/Berlin')"
# What is wrong within a field: the {problem} of INVALID_FIELD.
EMPTY_ELEMENT = "its list has an empty element"
INCOMPLETE = "'{part}' is incomplete"
NOT_A_VALUE = "'{part}' is not a number{names}"
OUT_OF_RANGE = "{part} is out of range {low}-{largest}"
BACKWARDS = "the range {part} goes backwards; a range goes from low to high"
ONE_VALUE_RANGE = "the range {part} has a single value; write {start}"
STEP_NOT_A_NUMBER = "the step '{step}' is not a number"
STEP_OUT_OF_RANGE = "the step {step} is out of range 1-{span}"
STEP_WITHOUT_RANGE = "a step follows * or a range; write {part}-{high}/{step}"
MISSED_RECORDED = 100  # after a long pause, at most this many missed fire times are recorded one by one


@dataclass(frozen=True)
class CronField:
    """What one field of an expression accepts: numbers from ``low`` to ``largest``, and names for some."""

    name: str
    low: int
    high: int  # the last distinct value
    largest: int  # the largest number accepted: above ``high`` only for the day of the week (7 is Sunday too)
    names: tuple[str, ...] = ()  # names[i] stands for low + i, in any case
    names_are: str = ""  # how a message calls them

    @property
    def span(self) -> int:
        """Return how many distinct values the field has: the largest step that still means something."""
        return self.high - self.low + 1


FIELDS = (
    CronField("minute", 0, 59, 59),
    CronField("hour", 0, 23, 23),
    CronField("day-of-month", 1, 31, 31),
    CronField("month", 1, 12, 12, MONTHS, "a month name"),
    CronField("day-of-week", 0, 6, 7, DAYS, "a day name"),
)
SECONDS_FIELDS = (CronField("second", 0, 59, 59), *FIELDS)


class _Refused(ValueError):
    """Raised when part of a field is not what the docs allow; its text says which part and why."""


def fields_of(cron: str) -> list[str]:
    """Return the whitespace-separated fields of an expression."""
    return cron.split()


def check_cron(cron: str, *, allow_seconds: bool) -> str:
    """Return the expression normalised (single spaces), or raise 422 ``invalid_cron`` saying what is wrong."""
    fields = fields_of(cron)
    if len(fields) != 5 and not (allow_seconds and len(fields) == 6):
        message = WRONG_FIELD_COUNT.format(
            cron=cron,
            count=len(fields),
            s="" if len(fields) == 1 else "s",
            fields=" ".join(kind.name for kind in FIELDS),
        )
        raise Unprocessable(message + (SECONDS_ALLOWED if allow_seconds else ""), code="invalid_cron")
    normalised = " ".join(fields)
    for kind, text in zip(SECONDS_FIELDS if len(fields) == 6 else FIELDS, fields, strict=True):
        try:
            _check_field(kind, text)
        except _Refused as refused:
            message = INVALID_FIELD.format(cron=normalised, name=kind.name, value=text, problem=refused)
            raise Unprocessable(message, code="invalid_cron") from None
    if _never_fires(normalised):  # each field is valid alone, but no date matches them all (31 February)
        raise Unprocessable(NEVER_FIRES.format(cron=normalised), code="invalid_cron")
    return normalised


def _check_field(kind: CronField, text: str) -> None:
    """Refuse a field unless it is a comma-separated list of elements the docs allow."""
    for element in text.split(","):
        _check_element(kind, element)


def _check_element(kind: CronField, element: str) -> None:
    """Refuse an element unless it is ``*``, a value or a range ``a-b``, then optionally a step ``/n``.

    A step after a single value (``5/15``) is refused too: cron implementations disagree on what it means, and
    croniter reads the day of the week's ``7/2`` as ``0,2,4,6`` where ``7-7/2`` would be Sunday alone.
    """
    if not element:
        raise _Refused(EMPTY_ELEMENT)
    base, slash, step = element.partition("/")
    if not base or (slash and not step):
        raise _Refused(INCOMPLETE.format(part=element))
    if base != "*":
        _check_range(kind, base)
    if slash:
        _check_step(kind, step)
        if base != "*" and "-" not in base:
            raise _Refused(STEP_WITHOUT_RANGE.format(part=base, high=kind.high, step=step))


def _check_range(kind: CronField, text: str) -> None:
    """Refuse a value or a range ``a-b`` unless both ends are values and ``a`` is below ``b``.

    croniter takes a reversed range as a wrap-around (``5-1`` is 0, 1 and 5-59) or as ``*`` (``1-0``), and a
    range of one value (``3-3``) as ``*``.
    """
    first, dash, last = text.partition("-")
    if not first or (dash and not last):
        raise _Refused(INCOMPLETE.format(part=text))
    start = _value(kind, first)
    if not dash:
        return
    end = _value(kind, last)
    if end == kind.low and start > kind.low and kind.largest > kind.high and not NUMBER.fullmatch(last):
        end = kind.largest  # "fri-sun", "mon-sun": the week's last day by name is 7 (croniter reads them so)
    if start > end:
        raise _Refused(BACKWARDS.format(part=text))
    if start == end:
        raise _Refused(ONE_VALUE_RANGE.format(part=text, start=first))


def _value(kind: CronField, text: str) -> int:
    """Return the number a field's number or name stands for, or refuse it."""
    if NUMBER.fullmatch(text):
        if not kind.low <= int(text) <= kind.largest:
            raise _Refused(OUT_OF_RANGE.format(part=text, low=kind.low, largest=kind.largest))
        return int(text)
    if text.lower() in kind.names:
        return kind.low + kind.names.index(text.lower())
    raise _Refused(NOT_A_VALUE.format(part=text, names=f" or {kind.names_are}" if kind.names else ""))


def _check_step(kind: CronField, text: str) -> None:
    """Refuse a step unless it is from 1 to the field's span: croniter takes ``*/61`` as ``0``."""
    if not NUMBER.fullmatch(text):
        raise _Refused(STEP_NOT_A_NUMBER.format(step=text))
    if not 1 <= int(text) <= kind.span:
        raise _Refused(STEP_OUT_OF_RANGE.format(step=text, span=kind.span))


def _never_fires(cron: str) -> bool:
    """Tell whether no date matches an expression whose fields are each valid."""
    try:
        _iterator(cron, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        return True
    return False


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
