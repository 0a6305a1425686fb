"""Durations such as 90s, 10m or 1h30m."""

from __future__ import annotations

import re

import pytest

from conveyor.spec.durations import parse_duration
from conveyor.spec.sizes import parse_size


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


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("50MB", 50_000_000),
        ("50 mb", 50_000_000),
        ("10MiB", 10 * 1024**2),
        ("1.5KiB", 1536),
        ("2kb", 2000),
        (" 1GiB ", 1024**3),
        ("1TB", 10**12),
        (1e9, 10**9),
        ("1.1KB", 1100),
        ("0.3MiB", 314572),
    ],
)
def test_sizes(value: str | int, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10 lines", "expected a size such as 50MB, 10MiB or 4096 (bytes), got '10 lines'"),
        ("MB", "expected a size"),
        ("-5MB", "expected a size"),
        (1.5, "expected a size such as 50MB, 10MiB or 4096 (bytes), got 1.5"),
        (True, "got true"),
        (999, "a size must be at least 1KB (1000 bytes), got 999"),
        (-1, "at least 1KB"),
        ("2TiB", "a size can be at most 1TB, got '2TiB'"),
        (10**30, "a size can be at most 1TB, got a very large number"),
        ("9" * 400 + "MB", "expected a size"),
        ("١٠٠٠٠", "expected a size"),
        ("1000.9", "a number of bytes is a whole number, got '1000.9'"),
    ],
)
def test_bad_sizes_are_explained(value: str | int | float, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(value)
