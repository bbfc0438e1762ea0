"""Durations as workflows write them: ``500ms``, ``30s``, ``5m``, ``1h30m``, or a bare number of seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")

DURATION_HELP = "a duration such as 500ms, 30s, 5m or 1h30m, or a number of seconds"


def parse_duration(value: object) -> float:
    """Return the duration in seconds.

    Parameters:
        value: an int or float (seconds), a string of digits (seconds), or a string such as ``1h30m``.

    Raises:
        ValueError: the value is not a duration, or is negative.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"expected {DURATION_HELP}, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            if not _WHOLE.fullmatch(text):
                raise ValueError(f"expected {DURATION_HELP}, got {value!r}") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART.findall(text))
    else:
        raise ValueError(f"expected {DURATION_HELP}, got {type(value).__name__}")
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    if seconds == math.inf:
        raise ValueError(f"a duration must be finite, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Return a short human form of a duration: ``850ms``, ``12.3s``, ``4m05s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
