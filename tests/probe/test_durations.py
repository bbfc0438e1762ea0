"""Durations as workflows write them."""

from __future__ import annotations

import pytest

from probe.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        (12, 12),
        ("12", 12),
        (0.25, 0.25),
        ("1m30s", 90),
        ("2d", 172800),
    ],
)
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5 minutes", "1x", "-3", "m5", True, None, [1], "inf", "nan", float("inf"), 1e400]
)
def test_malformed_durations_are_refused(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_durations_format_for_people():
    assert [format_duration(s) for s in (0.25, 12.34, 245, 5400)] == ["250ms", "12.3s", "4m05s", "1h30m"]
