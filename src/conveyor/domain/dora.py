"""DORA software delivery metrics of one environment over a window of time (pure).

The inputs are facts taken straight from the record (``conveyor.store.metrics`` reads them);
this module only counts and ranks them. All times are epoch seconds (UTC); the window is
``[since, until)``.

Definitions, for an environment E (default ``production``):

- **Attempted deployments**: deployments to E whose ``finished_epoch`` is in the window and
  whose status is ``succeeded``, ``failed`` or ``rolled_back``. Interrupted (and still running)
  deployments are ignored.
- ``deployments``: the *successful* deployments in the window.
- ``deployment_frequency_per_day``: ``deployments`` / the window's length in days.
- ``lead_time_hours``: for every commit a successful deployment in the window shipped to E for
  the first time, ``deployment finished_epoch - commit committed_epoch``, in hours; ``median``
  and ``p90`` (nearest rank, below) and ``commits`` (how many). ``median`` and ``p90`` are null
  when no commit was shipped. A commit dated after its deployment (a skewed clock) has no
  lead time: it is left out of the median and counted in ``skewed``.
- ``change_failure_rate``: attempted deployments that failed, were rolled back, are marked
  ``hotfix`` or are linked to an incident (any incident whose ``deployment_id`` is theirs,
  whenever it was opened), divided by attempted deployments. Null without attempted deployments.
- ``recovery_time_hours``: the ``median`` (nearest rank) of the recovery times of the failures
  in the window, and their ``count``. A failed or rolled-back attempted deployment recovers at
  the ``finished_epoch`` of the next successful deployment to E (strictly later, even after the
  window); an incident of E *opened* in the window recovers at its ``resolved_epoch``. Failures
  without a recovery yet are counted in ``unrecovered``, not in the median; an incident
  resolved before it was opened (a skewed clock) is counted in ``skewed``, not in the median.
  A failed deployment that also has an incident counts twice (once as each). Recoveries are
  read from the record as it is now, so a window in the past can still gain recoveries that
  happened later.
- ``rework_rate``: attempted deployments that were unplanned (rolled back, or marked
  ``hotfix``) / attempted deployments. Null without attempted deployments.
- ``override_rate``: attempted deployments made with a gate override (``overridden``) /
  attempted deployments. Null without attempted deployments.

Percentiles use the **nearest-rank** method everywhere: the p-th percentile of n values is the
value of rank ``ceil(p * n / 100)`` in ascending order, so it is always one of the values (the
median of an even number of values is the lower of the two middle ones).

Displayed numbers are rounded (hours to 0.001, rates and ``window_days`` to 0.0001, the
frequency to 0.0001 per day); levels are computed from the exact values.

Levels
------

``levels`` ranks each key against the four software delivery performance clusters (elite,
high, medium, low) of the **Accelerate State of DevOps Report 2023** (DORA, Google Cloud). The
report gives each cluster a *range* in words for deployment frequency, change lead time and
failed deployment recovery time, and a single *value* for the change failure rate; Conveyor
maps them to numbers as follows (a month is 30 days; lead and recovery times are the medians
above, the p90 is not ranked):

| level  | deployment frequency (report)            | per day f          |
|--------|------------------------------------------|--------------------|
| elite  | on demand                                | f > 1              |
| high   | between once per day and once per week   | 1/7 <= f <= 1      |
| medium | between once per week and once per month | 1/30 <= f < 1/7    |
| low    | between once per week and once per month | f < 1/30           |

| level  | change lead time (report)      | median hours h     |
|--------|--------------------------------|--------------------|
| elite  | less than one day              | h < 24             |
| high   | between one day and one week   | 24 <= h <= 168     |
| medium | between one week and one month | 168 < h <= 720     |
| low    | between one week and one month | h > 720            |

| level  | change failure rate (report) | rate r                 |
|--------|------------------------------|------------------------|
| elite  | 5%                           | r <= 7.5%              |
| high   | 10%                          | 7.5% < r <= 12.5%      |
| medium | 15%                          | 12.5% < r <= 39.5%     |
| low    | 64%                          | r > 39.5%              |

| level  | failed deployment recovery time (report) | median hours h |
|--------|------------------------------------------|----------------|
| elite  | less than one hour                       | h < 1          |
| high   | less than one day                        | 1 <= h < 24    |
| medium | between one day and one week             | 24 <= h <= 168 |
| low    | between one month and six months         | h > 168        |

Where the report is not a partition, Conveyor decides:

- "On demand" has no number: a frequency above the high range (more than once a day) is elite.
- The 2023 low cluster has the *same* frequency and lead-time ranges as the medium one (the
  report tells them apart by stability only). The shared range maps to medium; anything slower
  than every published range (less than once a month; more than a month) is low.
- Change failure rates are single values per cluster: a rate gets the level of the nearest
  published value (boundaries at the midpoints 7.5%, 12.5% and 39.5%; a tie goes to the better
  level).
- No cluster covers recovery times between one week and one month; they map to low, as do
  times beyond six months.
- ``rework_rate`` and ``override_rate`` have no published clusters (rework rate was added by
  DORA in 2024; override rate is Conveyor's own): their level is null, with the reason.
- A level is null, with the reason, when its value is null (no commits, no attempted
  deployment, no recovered failure). A frequency of zero is a value: low.

``levels`` has one entry per ranked field of the document, under the same name
(``deployment_frequency_per_day``, ``lead_time_hours``, ``change_failure_rate``,
``recovery_time_hours``, ``rework_rate``, ``override_rate``), each ``{"level": "elite" | "high" |
"medium" | "low" | null, "report": REPORT, "reason": <the matched range in the report's words,
or the nearest published value, or why there is no level>}``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

DEFAULT_ENVIRONMENT = "production"
REPORT = "Accelerate State of DevOps Report 2023 (DORA, Google Cloud)"
ATTEMPTED = ("succeeded", "failed", "rolled_back")
"""Statuses of the deployments the metrics count; ``interrupted`` and ``running`` are ignored."""
FAILED = ("failed", "rolled_back")

HOUR = 3600.0
DAY = 86400.0
_WEEK_H = 7 * 24.0
_MONTH_H = 30 * 24.0

Level = Literal["elite", "high", "medium", "low"]
Key = Literal[
    "deployment_frequency_per_day",
    "lead_time_hours",
    "change_failure_rate",
    "recovery_time_hours",
    "rework_rate",
    "override_rate",
]


@dataclass(slots=True)
class DeploymentFact:
    """One deployment to the environment, as recorded.

    Not frozen: a record holds 100,000 of them, and a frozen dataclass is three times as slow
    to build (measured on Python 3.11).
    """

    id: int
    status: str
    finished_epoch: float
    hotfix: bool = False
    overridden: bool = False
    incident: bool = False
    """Whether any incident names this deployment (``incidents.deployment_id``)."""


@dataclass(frozen=True, slots=True)
class IncidentFact:
    """One incident of the environment."""

    id: int
    opened_epoch: float
    resolved_epoch: float | None = None


@dataclass(frozen=True, slots=True)
class DoraInputs:
    """Everything ``compute`` needs about one environment and window.

    ``deployments`` are the attempted deployments finishing in the window (others are
    ignored); ``incidents`` those opened in the window (others are ignored); ``lead_times_s``
    one ``finished_epoch - committed_epoch`` per commit first shipped by a successful deployment
    in the window, in any order; ``next_success_epoch`` the ``finished_epoch`` of the first
    successful deployment finishing at or after the window's end, if any (to time the
    recovery of the window's last failures).
    """

    deployments: Sequence[DeploymentFact] = ()
    incidents: Sequence[IncidentFact] = ()
    lead_times_s: Sequence[float] = ()
    next_success_epoch: float | None = None


def percentile(values: Sequence[float], percent: int, *, presorted: bool = False) -> float | None:
    """Nearest-rank ``percent``-th percentile of ``values`` (1-100), ``None`` if there are none.

    The value of rank ``ceil(percent * n / 100)`` in ascending order (computed in integers);
    ``presorted`` says ``values`` are already ascending.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"a percentile is between 1 and 100, got {percent}")
    ordered = values if presorted else sorted(values)
    if not ordered:
        return None
    rank = -(-percent * len(ordered) // 100)
    return ordered[rank - 1]


def _frequency_level(per_day: float) -> tuple[Level, str]:
    if per_day > 1.0:
        return "elite", "on demand (more than once per day)"
    if per_day >= 1.0 / 7:
        return "high", "between once per day and once per week"
    if per_day >= 1.0 / 30:
        return "medium", "between once per week and once per month"
    return "low", "less than once per month: slower than every published range"


def _lead_time_level(hours: float) -> tuple[Level, str]:
    if hours < 24.0:
        return "elite", "less than one day"
    if hours <= _WEEK_H:
        return "high", "between one day and one week"
    if hours <= _MONTH_H:
        return "medium", "between one week and one month"
    return "low", "more than one month: slower than every published range"


def _change_failure_level(rate: float) -> tuple[Level, str]:
    if rate <= 0.075:
        return "elite", "nearest published value: 5%"
    if rate <= 0.125:
        return "high", "nearest published value: 10%"
    if rate <= 0.395:
        return "medium", "nearest published value: 15%"
    return "low", "nearest published value: 64%"


def _recovery_level(hours: float) -> tuple[Level, str]:
    if hours < 1.0:
        return "elite", "less than one hour"
    if hours < 24.0:
        return "high", "less than one day"
    if hours <= _WEEK_H:
        return "medium", "between one day and one week"
    if hours < _MONTH_H:
        return "low", "between one week and one month: in no published range"
    return "low", "between one month and six months, or longer"


_LEVELS = {
    "deployment_frequency_per_day": _frequency_level,
    "lead_time_hours": _lead_time_level,
    "change_failure_rate": _change_failure_level,
    "recovery_time_hours": _recovery_level,
}
_NO_CLUSTERS = {
    "rework_rate": "no published clusters: DORA added rework rate in 2024",
    "override_rate": "no published clusters: override rate is Conveyor's own measure",
}
_NO_VALUE = {
    "deployment_frequency_per_day": "no value",
    "lead_time_hours": "no commits shipped in the window",
    "change_failure_rate": "no attempted deployments in the window",
    "recovery_time_hours": "no recovered failures in the window",
}


def level_of(key: Key, value: float | None) -> dict[str, str | None]:
    """The performance level of one key's value: ``{"level", "report", "reason"}``.

    ``value`` is the frequency per day, the median lead or recovery time in hours, or a rate
    (0-1). Keys without published clusters, and missing values, get a null level and a reason.
    """
    if key in _NO_CLUSTERS:
        return {"level": None, "report": REPORT, "reason": _NO_CLUSTERS[key]}
    if key not in _LEVELS:
        raise ValueError(f"no DORA key {key!r}")
    if value is None:
        return {"level": None, "report": REPORT, "reason": _NO_VALUE[key]}
    level, reason = _LEVELS[key](value)
    return {"level": level, "report": REPORT, "reason": reason}


def window_days(since: float, until: float) -> float:
    """The length of ``[since, until)`` in days; ``ValueError`` unless it is finite and positive."""
    if not (math.isfinite(since) and math.isfinite(until)) or until <= since:
        raise ValueError(f"the window must end after it starts (since {since}, until {until})")
    return (until - since) / DAY


def iso(epoch: float) -> str:
    """An epoch as the record writes times: ISO 8601 UTC, microseconds, ``Z``."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _rate(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def compute(
    inputs: DoraInputs, *, environment: str = DEFAULT_ENVIRONMENT, since: float, until: float
) -> dict[str, Any]:
    """The metrics document (``conveyor metrics --json``) of ``inputs`` over ``[since, until)``."""
    days = window_days(since, until)
    attempted = [
        d for d in inputs.deployments if d.status in ATTEMPTED and since <= d.finished_epoch < until
    ]
    n = len(attempted)
    succeeded = sum(1 for d in attempted if d.status == "succeeded")
    failed = [d for d in attempted if d.status in FAILED]
    changes_failed = sum(1 for d in attempted if d.status in FAILED or d.hotfix or d.incident)
    rework = sum(1 for d in attempted if d.status == "rolled_back" or d.hotfix)
    overridden = sum(1 for d in attempted if d.overridden)
    frequency = succeeded / days

    lead = sorted(t for t in inputs.lead_times_s if t >= 0)
    lead_skewed = len(inputs.lead_times_s) - len(lead)
    lead_median = percentile(lead, 50, presorted=True)
    lead_p90 = percentile(lead, 90, presorted=True)

    successes = sorted(d.finished_epoch for d in inputs.deployments if d.status == "succeeded")
    if inputs.next_success_epoch is not None:
        successes.append(inputs.next_success_epoch)
        successes.sort()
    recoveries: list[float] = []
    unrecovered = 0
    recovery_skewed = 0
    for d in failed:
        i = bisect_right(successes, d.finished_epoch)
        if i < len(successes):
            recoveries.append(successes[i] - d.finished_epoch)
        else:
            unrecovered += 1
    for incident in inputs.incidents:
        if not since <= incident.opened_epoch < until:
            continue
        if incident.resolved_epoch is None:
            unrecovered += 1
        elif incident.resolved_epoch < incident.opened_epoch:
            recovery_skewed += 1
        else:
            recoveries.append(incident.resolved_epoch - incident.opened_epoch)
    recovery_median = percentile(recoveries, 50)

    lead_median_h = None if lead_median is None else lead_median / HOUR
    recovery_median_h = None if recovery_median is None else recovery_median / HOUR
    values: dict[Key, float | None] = {
        "deployment_frequency_per_day": frequency,
        "lead_time_hours": lead_median_h,
        "change_failure_rate": _rate(changes_failed, n),
        "recovery_time_hours": recovery_median_h,
        "rework_rate": _rate(rework, n),
        "override_rate": _rate(overridden, n),
    }
    return {
        "environment": environment,
        "since": iso(since),
        "until": iso(until),
        "window_days": round(days, 4),
        "deployments": succeeded,
        "attempted_deployments": n,
        "deployment_frequency_per_day": round(frequency, 4),
        "lead_time_hours": {
            "median": _round(lead_median_h, 3),
            "p90": _round(None if lead_p90 is None else lead_p90 / HOUR, 3),
            "commits": len(lead),
            "skewed": lead_skewed,
        },
        "change_failure_rate": _round(values["change_failure_rate"], 4),
        "recovery_time_hours": {
            "median": _round(recovery_median_h, 3),
            "count": len(recoveries),
            "unrecovered": unrecovered,
            "skewed": recovery_skewed,
        },
        "rework_rate": _round(values["rework_rate"], 4),
        "override_rate": _round(values["override_rate"], 4),
        "levels": {key: level_of(key, value) for key, value in values.items()},
    }
