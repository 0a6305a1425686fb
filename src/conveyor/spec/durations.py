"""Durations such as ``90s``, ``10m`` or ``1h30m``, as seconds."""

from __future__ import annotations

import math
import re

MAX_DURATION_S = 7 * 24 * 3600.0
"""Longest duration accepted (7 days)."""

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_ORDER = ("d", "h", "m", "s", "ms")
_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|d|h|m|s)\s*")
_NUMBER = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)\s*")
_EXPECTED = "expected a duration such as 90s, 10m or 1h30m"


def _limit(maximum: float) -> str:
    days = maximum / 86400
    return f"{days:g} days ({days:g}d)"


def _check(seconds: float, shown: str, maximum: float = MAX_DURATION_S) -> float:
    """``seconds`` if it is a usable duration, else ``ValueError`` mentioning ``shown``."""
    if math.isnan(seconds):
        raise ValueError(f"{_EXPECTED}, got {shown}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {shown}")
    if seconds == 0:
        raise ValueError(f"a duration must be longer than zero, got {shown}")
    if seconds > maximum:
        raise ValueError(f"a duration can be at most {_limit(maximum)}, got {shown}")
    return seconds


def parse_duration(text: str | int | float, maximum: float = MAX_DURATION_S) -> float:
    """Seconds in a duration.

    Numbers are seconds. Strings combine a number and a unit, largest unit first, each unit at
    most once: ``d``, ``h``, ``m``, ``s``, ``ms`` (``"1h30m"``, ``"1m 30s"``, ``"500ms"``,
    ``"1.5h"``); a bare number string is seconds too.

    Args:
        text: The duration as written in the pipeline file.

    Returns:
        The duration in seconds, more than zero and at most ``maximum`` (7 days by default).

    Raises:
        ValueError: With a message for the user when ``text`` is not such a duration.
    """
    if isinstance(text, bool):
        raise ValueError(f"{_EXPECTED}, got {str(text).lower()}")
    if isinstance(text, int | float):
        if abs(text) > 10 * maximum:
            huge = isinstance(text, int) and abs(text) > 10**15
            shown = "a very large number" if huge else repr(text)
            if text < 0:
                raise ValueError(f"a duration cannot be negative, got {shown}")
            raise ValueError(f"a duration can be at most {_limit(maximum)}, got {shown}")
        return _check(float(text), repr(text), maximum)
    if not isinstance(text, str):
        raise ValueError(f"{_EXPECTED}, got {text!r}")
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    if _NUMBER.fullmatch(text):
        return _check(float(text), shown, maximum)
    stripped = text.strip()
    if stripped.startswith("-") and _is_duration(stripped[1:]):
        raise ValueError(f"a duration cannot be negative, got {shown}")
    total = _sum_parts(stripped)
    if total is None:
        raise ValueError(f"{_EXPECTED}, got {shown}")
    return _check(total, shown, maximum)


def _is_duration(text: str) -> bool:
    return _sum_parts(text) is not None


def _sum_parts(text: str) -> float | None:
    """The seconds of ``<number><unit>...`` (units largest first, once each), else ``None``."""
    position, total, last = 0, 0.0, -1
    if not text:
        return None
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            return None
        unit = _ORDER.index(match.group(2))
        if unit <= last:
            return None
        last = unit
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    return total
