"""Change windows (freezes) of ``window`` gates: parsing and time-zone-aware matching (pure).

Grammar (several windows as a list, or in one string separated by commas; days ``Mon``..``Sun``
or full English names, any case; a window includes its start and excludes its end):

- ``DAY HH:MM-DAY HH:MM`` (``Fri 16:00-Mon 08:00``): a span, which may wrap the week end;
- ``DAY HH:MM-HH:MM`` (``Fri 22:00-06:00``): within a day; an end at or before the start is on
  the next day;
- ``DAY-DAY`` (``Sat-Sun``): whole days, inclusive, may wrap; ``DAY``: one whole day.

Windows are compared with the local wall-clock time of the gate's time zone (``zoneinfo``), so a
freeze keeps its local hours across daylight-saving changes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from conveyor.errors import ConveyorError

_WINDOW_HINT = (
    "write 'DAY HH:MM-DAY HH:MM' (e.g. 'Fri 16:00-Mon 08:00'), 'DAY HH:MM-HH:MM' "
    "(e.g. 'Wed 22:00-02:00'), 'DAY-DAY' (e.g. 'Sat-Sun') or 'DAY'; days are Mon, Tue, Wed, "
    "Thu, Fri, Sat, Sun"
)


class WindowError(ConveyorError):
    """A change window or a time zone cannot be used.

    ``index`` is the position of the window at fault in the list given, when known.
    """

    def __init__(self, message: str, *, index: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.index = index


# -------------------------------------------------------------------------------------- windows

_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAYS: dict[str, int] = {
    **{day.lower(): index for index, day in enumerate(_DAY_NAMES)},
    **{
        day: index
        for index, day in enumerate(
            ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
        )
    },
}
_DAY_SECONDS = 86_400
_WEEK_SECONDS = 7 * _DAY_SECONDS
_TIME = r"([0-9]{1,2}):([0-9]{2})"
_WORD = r"([A-Za-z]+)"
_SPAN = re.compile(rf"{_WORD}\s+{_TIME}\s*-\s*{_WORD}\s+{_TIME}", re.ASCII)
_WITHIN_DAY = re.compile(rf"{_WORD}\s+{_TIME}\s*-\s*{_TIME}", re.ASCII)
_DAYS_RANGE = re.compile(rf"{_WORD}(?:\s*-\s*{_WORD})?", re.ASCII)
_DAYS_WITH_TIMES = re.compile(rf"{_WORD}\s*-\s*{_WORD}\s+[0-9]", re.ASCII)
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*", re.ASCII)


@dataclass(frozen=True)
class Window:
    """A weekly span of local wall-clock time, as seconds since Monday 00:00.

    ``start`` is in ``[0, 604800)``; ``length`` in ``(0, 604800]``; the span may wrap the end of
    the week. ``text`` is the window as written (whitespace collapsed).
    """

    text: str
    start: int
    length: int

    def contains(self, second_of_week: int) -> bool:
        """Whether a local time, as seconds since Monday 00:00, is inside the window."""
        return (second_of_week - self.start) % _WEEK_SECONDS < self.length

    def remaining(self, second_of_week: int) -> int:
        """Seconds from a local time inside the window until its end."""
        return self.length - (second_of_week - self.start) % _WEEK_SECONDS

    def __str__(self) -> str:
        return self.text


def _window_error(text: str, problem: str, index: int) -> WindowError:
    return WindowError(f"change window '{text}': {problem}", index=index, hint=_WINDOW_HINT)


def _parse_window(raw: str, index: int) -> Window:
    text = " ".join(raw.split())

    def day(word: str) -> int:
        found = _DAYS.get(word.lower())
        if found is None:
            raise _window_error(
                text, f"unknown day '{word}'; use Mon, Tue, Wed, Thu, Fri, Sat or Sun", index
            )
        return found

    def clock(hours: str, minutes: str, *, end: bool) -> int:
        h, m = int(hours), int(minutes)
        if end and (h, m) == (24, 0):
            return _DAY_SECONDS
        if h > 23 or m > 59:
            raise _window_error(
                text, f"'{hours}:{minutes}' is not a time from 00:00 to 23:59", index
            )
        return h * 3600 + m * 60

    if not text:
        raise _window_error(text, "the window is empty", index)
    match = _SPAN.fullmatch(text)
    if match:
        first, h1, m1, last, h2, m2 = match.groups()
        start = day(first) * _DAY_SECONDS + clock(h1, m1, end=False)
        end = day(last) * _DAY_SECONDS + clock(h2, m2, end=True)
        length = (end - start) % _WEEK_SECONDS
        if length == 0:
            raise _window_error(
                text, "it starts and ends at the same time; for a whole week write 'Mon-Sun'", index
            )
        return Window(text, start, length)
    match = _WITHIN_DAY.fullmatch(text)
    if match:
        first, h1, m1, h2, m2 = match.groups()
        begin, end = clock(h1, m1, end=False), clock(h2, m2, end=True)
        if begin == end:
            raise _window_error(text, "it starts and ends at the same time", index)
        length = end - begin if end > begin else end + _DAY_SECONDS - begin
        return Window(text, day(first) * _DAY_SECONDS + begin, length)
    match = _DAYS_RANGE.fullmatch(text)
    if match:
        first, last = match.groups()
        start_day = day(first)
        days = (day(last) - start_day) % 7 + 1 if last else 1
        return Window(text, start_day * _DAY_SECONDS, days * _DAY_SECONDS)
    if _DAYS_WITH_TIMES.match(text):
        raise _window_error(
            text,
            "a range of days cannot have times; write one window per day "
            "(e.g. 'Mon 22:00-06:00', 'Tue 22:00-06:00') or a span ('Fri 16:00-Mon 08:00')",
            index,
        )
    raise _window_error(text, "not a window", index)


def parse_windows(spec: str | Sequence[str]) -> list[Window]:
    """Parse change windows (grammar in the module docstring).

    ``spec`` is one string (windows may be separated by commas) or a list of strings.

    Raises:
        WindowError: a window is malformed; ``index`` is its position in the list.
    """
    items: Sequence[object] = [spec] if isinstance(spec, str) else spec
    windows: list[Window] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise WindowError(
                f"change window {index + 1} is not a string ({item!r})",
                index=index,
                hint=_WINDOW_HINT,
            )
        for part in item.split(","):
            windows.append(_parse_window(part, index))
    return windows


def _zone(name: str) -> ZoneInfo:
    hint = "use an IANA time zone name such as 'Europe/Berlin', 'America/New_York' or 'UTC'"
    if not isinstance(name, str) or len(name) > 64 or not _ZONE_NAME.fullmatch(name):
        raise WindowError(f"'{name}' is not a time zone name", hint=hint)
    if name in ("localtime", "posixrules"):
        raise WindowError(f"'{name}' depends on the machine; name the time zone", hint=hint)
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError, UnicodeError):
        raise WindowError(f"unknown time zone '{name}'", hint=hint) from None


def check_timezone(name: str) -> None:
    """Raise :class:`WindowError` unless ``name`` is a known IANA time zone."""
    _zone(name)


def _covered_for(windows: Sequence[Window], second: int) -> int | None:
    """Seconds from ``second`` until no window covers the time; ``None``: they cover all week."""
    offset = 0
    for _ in range(len(windows) + 2):
        at = (second + offset) % _WEEK_SECONDS
        remaining = [w.remaining(at) for w in windows if w.contains(at)]
        if not remaining:
            return offset
        offset += max(remaining)
        if offset >= _WEEK_SECONDS:
            return None
    return None


def _instant_after(local: datetime, seconds: int, at: datetime) -> datetime:
    """The first instant after ``at`` whose wall-clock time is ``seconds`` after ``local``'s.

    A wall-clock time skipped by a clock change maps to the first instant after the gap; one
    that occurs twice maps to the first occurrence after ``at``.
    """
    tz = local.tzinfo
    wall = local.replace(tzinfo=None, microsecond=0) + timedelta(seconds=seconds)
    instants = sorted({wall.replace(tzinfo=tz, fold=fold).astimezone(UTC) for fold in (0, 1)})
    real = [u for u in instants if u.astimezone(tz).replace(tzinfo=None) == wall]
    if not real:  # the clocks went forward over ``wall``: find the end of the gap
        low, high = int(instants[0].timestamp()), int(instants[-1].timestamp())
        while high - low > 1:
            middle = (low + high) // 2
            if datetime.fromtimestamp(middle, tz).replace(tzinfo=None) >= wall:
                high = middle
            else:
                low = middle
        real = [datetime.fromtimestamp(high, UTC)]
    later = [u for u in real if u > at]
    return (later[0] if later else real[-1]).astimezone(tz)
