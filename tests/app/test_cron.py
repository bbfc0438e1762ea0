"""Checking cron expressions: every form docs/API.md documents is accepted, and nothing that croniter would read
with another meaning (a reversed range, a step larger than its field, a random ``R``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import NamedTuple

import pytest
from croniter import croniter

from app.errors import Unprocessable
from app.schedules.cron import check_cron


class Field(NamedTuple):
    """A field as docs/API.md documents it: values from ``low`` to ``high``, numbers up to ``largest`` (7: Sunday)."""

    name: str
    low: int
    high: int
    largest: int

    @property
    def span(self) -> int:
        """Return how many distinct values the field has."""
        return self.high - self.low + 1


FIELDS = (
    Field("minute", 0, 59, 59),
    Field("hour", 0, 23, 23),
    Field("day-of-month", 1, 31, 31),
    Field("month", 1, 12, 12),
    Field("day-of-week", 0, 6, 7),  # 7 is Sunday too
)

DOCUMENTED = [
    "* * * * *",
    "*/5 * * * *",
    "0,30 * * * *",
    "0-30/10 * * * *",
    "30 2 * * *",
    "05 9-17 * * mon-fri",
    "0 9-17/2 * * MON-FRI",
    "0 0 1 jan,jul *",
    "0 0 1 Jan-Mar,oct-DEC/2 *",
    "0 0 * * 0",
    "0 0 * * 7",
    "0 0 * * 5-7",
    "0 0 * * sat,sun",
    "0 0 * * fri-sun",  # Sunday by name ends a range as 7
    "0 12 * * Mon-Sun",
    "59 23 31 12 6",
    "0 0 29 2 *",
    "0 0 1 * mon",
    "1-5,10-15,*/20 * * * *",
    "*/60 */24 */31 */12 */7",
]


@pytest.mark.parametrize("expression", DOCUMENTED)
def test_every_documented_form_is_accepted_as_it_is(expression: str) -> None:
    assert check_cron(expression, allow_seconds=False) == expression


@pytest.mark.parametrize(
    ("expression", "field", "problem"),
    [
        ("1-0 * * * *", "minute", "the range 1-0 goes backwards; a range goes from low to high"),
        ("5-1 * * * *", "minute", "the range 5-1 goes backwards; a range goes from low to high"),
        ("0 0 * * fri-mon", "day-of-week", "the range fri-mon goes backwards; a range goes from low to high"),
        ("3-3 * * * *", "minute", "the range 3-3 has a single value; write 3"),
        ("0 0 * * 7-7", "day-of-week", "the range 7-7 has a single value; write 7"),
        ("0 0 * * sun-sun", "day-of-week", "the range sun-sun has a single value; write sun"),
        ("0 0 * * fri-0", "day-of-week", "the range fri-0 goes backwards; a range goes from low to high"),
        ("R * * * *", "minute", "'R' is not a number"),
        ("H * * * *", "minute", "'H' is not a number"),
        ("*/61 * * * *", "minute", "the step 61 is out of range 1-60"),
        ("0 */25 * * *", "hour", "the step 25 is out of range 1-24"),
        ("0 0 * * */8", "day-of-week", "the step 8 is out of range 1-7"),
        ("*/0 * * * *", "minute", "the step 0 is out of range 1-60"),
        ("*/x * * * *", "minute", "the step 'x' is not a number"),
        ("5/15 * * * *", "minute", "a step follows * or a range; write 5-59/15"),
        ("0 0 * * 5#6", "day-of-week", "'5#6' is not a number or a day name"),
        ("0 0 * * 5#2", "day-of-week", "'5#2' is not a number or a day name"),
        ("0 0 L * *", "day-of-month", "'L' is not a number"),
        ("0 0 15W * *", "day-of-month", "'15W' is not a number"),
        ("0 0 ? * *", "day-of-month", "'?' is not a number"),
        ("0 0 * * funday", "day-of-week", "'funday' is not a number or a day name"),
        ("0 0 * mon *", "month", "'mon' is not a number or a month name"),
        ("61 * * * *", "minute", "61 is out of range 0-59"),
        ("0 1,24 * * *", "hour", "24 is out of range 0-23"),
        ("0 0 0 * *", "day-of-month", "0 is out of range 1-31"),
        ("0 0 * * 8", "day-of-week", "8 is out of range 0-7"),
        ("\u0663 * * * *", "minute", "'\u0663' is not a number"),  # an Arabic-Indic 3: isdigit() takes it
        ("1,,2 * * * *", "minute", "its list has an empty element"),
        ("-5 * * * *", "minute", "'-5' is incomplete"),
        ("*/ * * * *", "minute", "'*/' is incomplete"),
    ],
)
def test_a_form_the_docs_do_not_allow_is_refused_naming_its_field_and_the_part(
    expression: str, field: str, problem: str
) -> None:
    with pytest.raises(Unprocessable) as refused:
        check_cron(expression, allow_seconds=False)
    value = expression.split()[[kind.name for kind in FIELDS].index(field)]
    assert refused.value.code == "invalid_cron"
    assert refused.value.message == (
        f"the cron expression '{expression}' is invalid: its {field} field '{value}' is not valid ({problem})"
    )


def test_the_seconds_field_is_checked_like_the_others() -> None:
    assert check_cron("*/2 * * * * *", allow_seconds=True) == "*/2 * * * * *"
    with pytest.raises(Unprocessable, match=r"its second field '\*/61' is not valid \(the step 61 is out of range"):
        check_cron("*/61 * * * * *", allow_seconds=True)
    with pytest.raises(Unprocessable, match="its second field '5-5' is not valid"):
        check_cron("5-5 * * * * *", allow_seconds=True)


def candidates(kind: Field) -> Iterator[tuple[str, set[int] | None]]:
    """Yield steps and ranges of a field, each with the values it names (None: the docs do not allow it)."""
    for step in range(kind.span + 2):
        yield f"*/{step}", named(kind, kind.low, kind.high, step)
    ends = sorted({kind.low, kind.low + 1, (kind.low + kind.high) // 2, kind.high - 1, kind.high, kind.largest})
    for start in ends:
        for end in ends:
            yield f"{start}-{end}", named(kind, start, end, 1)
            for step in (2, 3, kind.span, kind.span + 1):
                yield f"{start}-{end}/{step}", named(kind, start, end, step)


def named(kind: Field, start: int, end: int, step: int) -> set[int] | None:
    """Return the values from ``start`` to ``end`` by ``step``, or None if the range goes backwards or the step
    is larger than the field."""
    if start > end or not 1 <= step <= kind.span:
        return None
    return {sunday_as_0(kind, value) for value in range(start, end + 1, step)}


def sunday_as_0(kind: Field, value: int) -> int:
    """Return a value of a field, with the day of the week's 7 (Sunday) as 0."""
    return value % 7 if kind.name == "day-of-week" else value


def fires_at(expression: str, position: int) -> set[int]:
    """Return the values croniter fires at in one field of an expression."""
    kind = FIELDS[position]
    values = croniter(expression, datetime(2000, 1, 1)).expanded[position]
    everything = range(kind.low, kind.high + 1)
    return {sunday_as_0(kind, int(value)) for value in (everything if values == ["*"] else values)}


@pytest.mark.parametrize("kind", FIELDS, ids=[kind.name for kind in FIELDS])
def test_a_range_or_step_that_is_accepted_fires_at_exactly_the_values_it_names(kind: Field) -> None:
    position = FIELDS.index(kind)
    for text, meaning in candidates(kind):
        expression = " ".join(text if i == position else "*" for i in range(len(FIELDS)))
        try:
            check_cron(expression, allow_seconds=False)
        except Unprocessable:
            continue
        assert meaning is not None, f"'{expression}' is not what the docs allow, yet it was accepted"
        assert fires_at(expression, position) == meaning, f"'{expression}' was accepted with another meaning"
