"""DORA metrics (pure): a small history whose every number is computed by hand below.

The history (``HISTORY``, ``INCIDENTS``) is shared with the store's contract test, which writes
it into a real record and expects the same document (``EXPECTED``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.domain.dora import (
    REPORT,
    DeploymentFact,
    DoraInputs,
    IncidentFact,
    compute,
    iso,
    level_of,
    percentile,
    window_days,
)

H = 3600.0
D = 86400.0
T0 = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
SINCE, UNTIL = T0, T0 + 10 * D  # a 10-day window, [since, until)


@dataclass(frozen=True)
class Row:
    """One deployment of the history, as the record holds it."""

    id: int
    environment: str
    status: str
    finished: float | None
    hotfix: bool = False
    overridden: bool = False
    commits: tuple[tuple[str, float], ...] = ()
    """(commit, committed_epoch) of the commits it shipped to its environment first."""


def shipped(finished: float, **lead_hours: float) -> tuple[tuple[str, float], ...]:
    """Commits made ``lead_hours`` before ``finished``."""
    return tuple((commit, finished - hours * H) for commit, hours in lead_hours.items())


HISTORY: list[Row] = [
    Row(1, "production", "succeeded", T0 - D, commits=shipped(T0 - D, c0=5)),  # before
    Row(2, "production", "succeeded", T0 + D, commits=shipped(T0 + D, c1=2, c2=4)),
    Row(3, "production", "failed", T0 + 2 * D),
    Row(
        4,
        "production",
        "succeeded",
        T0 + 2 * D + 3 * H,
        commits=shipped(T0 + 2 * D + 3 * H, c3=1, c4=6, c5=10),
    ),
    Row(5, "production", "rolled_back", T0 + 4 * D),
    Row(
        6,
        "production",
        "succeeded",
        T0 + 4 * D + 0.5 * H,
        hotfix=True,
        commits=shipped(T0 + 4 * D + 0.5 * H, c6=0.5),
    ),
    # staging shipped c7 and c8 first (8 h and 18 h after they were made); production ships
    # them later (20 h and 30 h after), for the first time there
    Row(
        7,
        "staging",
        "succeeded",
        T0 + 5 * D + 12 * H,
        commits=shipped(T0 + 5 * D + 12 * H, c7=8, c8=18),
    ),
    Row(
        8,
        "production",
        "succeeded",
        T0 + 6 * D,
        overridden=True,
        commits=shipped(T0 + 6 * D, c7=20, c8=30),
    ),
    Row(9, "production", "interrupted", T0 + 7 * D),
    Row(10, "production", "succeeded", T0 + 8 * D, commits=shipped(T0 + 8 * D, c9=48, c10=12)),
    Row(11, "production", "failed", T0 + 9 * D),
    Row(12, "production", "running", None),
    Row(13, "production", "succeeded", UNTIL, commits=shipped(UNTIL, c11=1)),  # at `until`
]
# (id, environment, deployment_id, opened, resolved)
INCIDENTS: list[tuple[int, str, int | None, float, float | None]] = [
    (1, "production", 8, T0 + 6 * D + 1 * H, T0 + 6 * D + 2.5 * H),  # 90 min
    (2, "production", None, T0 + 9 * D + 12 * H, None),  # unresolved
    (3, "production", 10, UNTIL + 1 * H, UNTIL + 2 * H),  # opened after the window
    (4, "production", 1, T0 - 12 * H, T0 - 10 * H),  # opened before the window
    (5, "staging", 7, T0 + 5 * D + 13 * H, T0 + 5 * D + 14 * H),  # another environment
]

# What the store reads for production over [SINCE, UNTIL): written out by hand.
# Attempted deployments: 2, 3, 4, 5, 6, 8, 10, 11 (not 1: before; 7: staging; 9: interrupted;
# 12: running; 13: finished at `until`, outside the half-open window).
INPUTS = DoraInputs(
    deployments=[
        DeploymentFact(2, "succeeded", T0 + 1 * D),
        DeploymentFact(3, "failed", T0 + 2 * D),
        DeploymentFact(4, "succeeded", T0 + 2 * D + 3 * H),
        DeploymentFact(5, "rolled_back", T0 + 4 * D),
        DeploymentFact(6, "succeeded", T0 + 4 * D + 0.5 * H, hotfix=True),
        DeploymentFact(8, "succeeded", T0 + 6 * D, overridden=True, incident=True),  # incident 1
        DeploymentFact(10, "succeeded", T0 + 8 * D, incident=True),  # incident 3, opened later
        DeploymentFact(11, "failed", T0 + 9 * D),
    ],
    # opened in the window, in production: 1 and 2 (3 after, 4 before, 5 is staging)
    incidents=[
        IncidentFact(1, T0 + 6 * D + 1 * H, T0 + 6 * D + 2.5 * H),
        IncidentFact(2, T0 + 9 * D + 12 * H, None),
    ],
    # lead times of the commits shipped by 2, 4, 6, 8 and 10, in hours:
    #   2: c1 2, c2 4;  4: c3 1, c4 6, c5 10;  6: c6 0.5;  8: c7 20, c8 30;  10: c9 48, c10 12
    lead_times_s=[h * H for h in (2, 4, 1, 6, 10, 0.5, 20, 30, 48, 12)],
    next_success_epoch=UNTIL,  # deployment 13
)


def level(name: str | None, reason: str) -> dict[str, str | None]:
    return {"level": name, "report": REPORT, "reason": reason}


EXPECTED: dict[str, Any] = {
    "environment": "production",
    "since": "2026-01-01T00:00:00.000000Z",
    "until": "2026-01-11T00:00:00.000000Z",
    "window_days": 10.0,
    # successful: 2, 4, 6, 8, 10
    "deployments": 5,
    "attempted_deployments": 8,
    # 5 / 10 days
    "deployment_frequency_per_day": 0.5,
    # sorted hours: 0.5 1 2 4 6 10 12 20 30 48 (n = 10)
    # median: rank ceil(50 * 10 / 100) = 5 -> 6; p90: rank ceil(90 * 10 / 100) = 9 -> 30
    "lead_time_hours": {"median": 6.0, "p90": 30.0, "commits": 10, "skewed": 0},
    # 3 failed, 5 rolled back, 6 hotfix, 8 incident 1, 10 incident 3 (opened after the window
    # but linked), 11 failed: 6 / 8
    "change_failure_rate": 0.75,
    # 3 -> 4: 3 h; 5 -> 6: 0.5 h; 11 -> 13 (after the window): 24 h; incident 1: 1.5 h;
    # incident 2: unresolved. Sorted 0.5 1.5 3 24 (n = 4): rank ceil(50 * 4 / 100) = 2 -> 1.5
    "recovery_time_hours": {"median": 1.5, "count": 4, "unrecovered": 1, "skewed": 0},
    # 5 rolled back, 6 hotfix: 2 / 8
    "rework_rate": 0.25,
    # 8: 1 / 8
    "override_rate": 0.125,
    "levels": {
        "deployment_frequency_per_day": level("high", "between once per day and once per week"),
        "lead_time_hours": level("elite", "less than one day"),
        "change_failure_rate": level("low", "nearest published value: 64%"),
        "recovery_time_hours": level("high", "less than one day"),
        "rework_rate": level(None, "no published clusters: DORA added rework rate in 2024"),
        "override_rate": level(
            None, "no published clusters: override rate is Conveyor's own measure"
        ),
    },
}


def test_the_history_gives_the_hand_computed_document() -> None:
    assert compute(INPUTS, environment="production", since=SINCE, until=UNTIL) == EXPECTED


def test_the_order_of_the_facts_does_not_matter() -> None:
    shuffled = DoraInputs(
        deployments=list(reversed(INPUTS.deployments)),
        incidents=list(reversed(INPUTS.incidents)),
        lead_times_s=sorted(INPUTS.lead_times_s, reverse=True),
        next_success_epoch=INPUTS.next_success_epoch,
    )
    assert compute(shuffled, since=SINCE, until=UNTIL) == EXPECTED


def test_facts_outside_the_window_or_not_attempted_are_ignored() -> None:
    extra = DoraInputs(
        deployments=[
            *INPUTS.deployments,
            DeploymentFact(1, "succeeded", T0 - D, hotfix=True),
            DeploymentFact(9, "interrupted", T0 + 7 * D, overridden=True),
            DeploymentFact(12, "running", T0 + 7 * D),
        ],
        incidents=[*INPUTS.incidents, IncidentFact(3, UNTIL + H, UNTIL + 2 * H)],
        lead_times_s=INPUTS.lead_times_s,
        next_success_epoch=INPUTS.next_success_epoch,
    )
    assert compute(extra, since=SINCE, until=UNTIL) == EXPECTED


def test_an_empty_window() -> None:
    doc = compute(DoraInputs(), environment="staging", since=SINCE, until=SINCE + 7 * D)
    assert doc["environment"] == "staging"
    assert doc["window_days"] == 7.0
    assert (doc["deployments"], doc["attempted_deployments"]) == (0, 0)
    assert doc["deployment_frequency_per_day"] == 0.0
    assert doc["lead_time_hours"] == {"median": None, "p90": None, "commits": 0, "skewed": 0}
    assert doc["change_failure_rate"] is None
    assert doc["recovery_time_hours"] == {"median": None, "count": 0, "unrecovered": 0, "skewed": 0}
    assert (doc["rework_rate"], doc["override_rate"]) == (None, None)
    levels = doc["levels"]
    # a frequency of zero is a value (slower than once a month); the others have none
    assert levels["deployment_frequency_per_day"]["level"] == "low"
    assert levels["lead_time_hours"] == level(None, "no commits shipped in the window")
    assert levels["change_failure_rate"] == level(None, "no attempted deployments in the window")
    assert levels["recovery_time_hours"] == level(None, "no recovered failures in the window")


def test_successes_without_commits_have_no_lead_time() -> None:
    doc = compute(replace(INPUTS, lead_times_s=[]), since=SINCE, until=UNTIL)
    assert doc["lead_time_hours"] == {"median": None, "p90": None, "commits": 0, "skewed": 0}
    assert doc["levels"]["lead_time_hours"]["level"] is None
    assert doc["deployments"] == 5


def test_a_failure_without_a_later_success_is_unrecovered() -> None:
    # Without deployment 13, failure 11 (day 9) has no later success: 0.5 1.5 3 remain,
    # median rank ceil(50 * 3 / 100) = 2 -> 1.5 h; unrecovered: failure 11 and incident 2.
    doc = compute(replace(INPUTS, next_success_epoch=None), since=SINCE, until=UNTIL)
    assert doc["recovery_time_hours"] == {"median": 1.5, "count": 3, "unrecovered": 2, "skewed": 0}


def test_only_failures_are_unrecovered() -> None:
    inputs = DoraInputs(deployments=[DeploymentFact(1, "failed", SINCE + H)])
    doc = compute(inputs, since=SINCE, until=UNTIL)
    assert doc["recovery_time_hours"] == {"median": None, "count": 0, "unrecovered": 1, "skewed": 0}
    assert doc["change_failure_rate"] == 1.0
    assert doc["rework_rate"] == 0.0  # failed, not rolled back: planned work
    assert doc["deployments"] == 0


def test_a_success_at_the_same_instant_does_not_recover_a_failure() -> None:
    # recovery is at the next success *strictly* later: the one at +2 h, not the one at +1 h
    inputs = DoraInputs(
        deployments=[
            DeploymentFact(1, "succeeded", SINCE + H),
            DeploymentFact(2, "failed", SINCE + H),
            DeploymentFact(3, "succeeded", SINCE + 2 * H),
        ]
    )
    doc = compute(inputs, since=SINCE, until=UNTIL)
    assert doc["recovery_time_hours"] == {"median": 1.0, "count": 1, "unrecovered": 0, "skewed": 0}


def test_the_window_must_not_be_empty() -> None:
    with pytest.raises(ValueError, match="end after it starts"):
        compute(DoraInputs(), since=UNTIL, until=UNTIL)
    with pytest.raises(ValueError):
        window_days(SINCE, float("nan"))
    assert window_days(SINCE, SINCE + 36 * H) == 1.5


def test_times_are_shown_in_the_records_format() -> None:
    assert iso(T0 + 1.25) == "2026-01-01T00:00:01.250000Z"


@pytest.mark.parametrize(
    ("values", "percent", "expected"),
    [
        ([], 50, None),
        ([7.0], 50, 7.0),
        ([7.0], 90, 7.0),
        ([4.0, 1.0, 3.0, 2.0], 50, 2.0),  # rank ceil(2) = 2: the lower middle value
        ([4.0, 1.0, 3.0, 2.0], 90, 4.0),  # rank ceil(3.6) = 4
        ([5.0, 1.0, 4.0, 2.0, 3.0], 50, 3.0),  # rank ceil(2.5) = 3
        ([float(i) for i in range(1, 11)], 90, 9.0),  # rank 9 exactly, no float rounding
        ([float(i) for i in range(1, 101)], 90, 90.0),
        ([float(i) for i in range(1, 102)], 90, 91.0),  # rank ceil(90.9) = 91
        ([3.0, 1.0, 2.0], 100, 3.0),
        ([3.0, 1.0, 2.0], 1, 1.0),
    ],
)
def test_percentile_is_nearest_rank(
    values: list[float], percent: int, expected: float | None
) -> None:
    assert percentile(values, percent) == expected


def test_percentile_rejects_impossible_ranks() -> None:
    for percent in (0, 101, -5):
        with pytest.raises(ValueError):
            percentile([1.0], percent)


@pytest.mark.parametrize(
    ("per_day", "expected"),
    [
        (1.0001, "elite"),
        (1.0, "high"),  # "between once per day and once per week" includes once a day
        (1 / 7, "high"),
        (1 / 7 - 1e-9, "medium"),
        (1 / 30, "medium"),
        (1 / 30 - 1e-9, "low"),
        (0.0, "low"),
    ],
)
def test_frequency_levels(per_day: float, expected: str) -> None:
    assert level_of("deployment_frequency_per_day", per_day)["level"] == expected


@pytest.mark.parametrize(
    ("hours", "expected"),
    [
        (0.0, "elite"),
        (23.999, "elite"),
        (24.0, "high"),
        (168.0, "high"),
        (168.001, "medium"),
        (720.0, "medium"),
        (720.001, "low"),
    ],
)
def test_lead_time_levels(hours: float, expected: str) -> None:
    assert level_of("lead_time_hours", hours)["level"] == expected


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (0.0, "elite"),
        (0.075, "elite"),
        (0.0751, "high"),
        (0.125, "high"),
        (0.1251, "medium"),
        (0.395, "medium"),
        (0.3951, "low"),
        (1.0, "low"),
    ],
)
def test_change_failure_levels(rate: float, expected: str) -> None:
    assert level_of("change_failure_rate", rate)["level"] == expected


@pytest.mark.parametrize(
    ("hours", "expected", "reason"),
    [
        (0.999, "elite", "less than one hour"),
        (1.0, "high", "less than one day"),
        (23.999, "high", "less than one day"),
        (24.0, "medium", "between one day and one week"),
        (168.0, "medium", "between one day and one week"),
        (168.001, "low", "between one week and one month: in no published range"),
        (720.0, "low", "between one month and six months, or longer"),
        (5000.0, "low", "between one month and six months, or longer"),
    ],
)
def test_recovery_levels(hours: float, expected: str, reason: str) -> None:
    assert level_of("recovery_time_hours", hours) == level(expected, reason)


def test_keys_without_clusters_have_no_level_whatever_the_value() -> None:
    assert level_of("rework_rate", 0.0)["level"] is None
    assert level_of("override_rate", 0.5)["level"] is None
    with pytest.raises(ValueError):
        level_of("mttr", 1.0)  # type: ignore[arg-type]


def test_skewed_clocks_are_counted_not_rated() -> None:
    """A commit dated after its deployment, or an incident resolved before it opened, says
    nothing about speed: left out of the medians (which would be negative) and counted."""
    from conveyor.domain.dora import DoraInputs, IncidentFact, compute

    inputs = DoraInputs(
        lead_times_s=[-3600.0 * 27000, 7200.0],
        incidents=[IncidentFact(id=1, opened_epoch=1000.0, resolved_epoch=1000.0 - 7200.0)],
    )
    doc = compute(inputs, since=0.0, until=86400.0)
    assert doc["lead_time_hours"]["median"] == 2.0
    assert doc["lead_time_hours"]["skewed"] == 1
    assert doc["recovery_time_hours"]["median"] is None
    assert doc["recovery_time_hours"]["skewed"] == 1
