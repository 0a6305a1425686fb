"""Durations such as 90s, 10m or 1h30m."""

from __future__ import annotations

import pytest

from conveyor.spec.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("1h 30m", 5400.0),
        (" 1m 30s ", 90.0),
        ("500ms", 0.5),
        ("1s500ms", 1.5),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
        ("7d", 604800.0),
        ("45", 45.0),
        ("2.5", 2.5),
    ],
)
def test_accepted(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ten", "expected a duration such as 90s, 10m or 1h30m, got 'ten'"),
        ("10x", "expected a duration such as 90s, 10m or 1h30m, got '10x'"),
        ("", "expected a duration such as 90s, 10m or 1h30m, got ''"),
        ("  ", "expected a duration such as 90s, 10m or 1h30m, got '  '"),
        ("m", "expected a duration such as 90s, 10m or 1h30m, got 'm'"),
        ("30s1m", "expected a duration such as 90s, 10m or 1h30m, got '30s1m'"),
        ("1m1m", "expected a duration such as 90s, 10m or 1h30m, got '1m1m'"),
        ("nan", "expected a duration such as 90s, 10m or 1h30m, got 'nan'"),
        (float("nan"), "expected a duration such as 90s, 10m or 1h30m, got nan"),
        (True, "expected a duration such as 90s, 10m or 1h30m, got true"),
        ("-5s", "a duration cannot be negative, got '-5s'"),
        (-5, "a duration cannot be negative, got -5"),
        ("-5", "a duration cannot be negative, got '-5'"),
        (0, "a duration must be longer than zero, got 0"),
        ("0s", "a duration must be longer than zero, got '0s'"),
        ("8d", "a duration can be at most 7 days (7d), got '8d'"),
        ("169h", "a duration can be at most 7 days (7d), got '169h'"),
        (float("inf"), "a duration can be at most 7 days (7d), got inf"),
        (10**400, "a duration can be at most 7 days (7d), got a very large number"),
        (-(10**400), "a duration cannot be negative, got a very large number"),
    ],
)
def test_refused(text: str | int | float, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value).startswith(message)
