"""Statuses of runs, stages and jobs, and which of them are final."""

from __future__ import annotations

from typing import Literal

RunStatus = Literal["running", "succeeded", "failed", "cancelled", "interrupted"]
StageStatus = Literal[
    "pending", "running", "succeeded", "failed", "cancelled", "skipped", "interrupted"
]
JobStatus = Literal[
    "pending",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "cancelled",
    "skipped",
    "cached",
    "interrupted",
]
AttemptStatus = Literal["running", "succeeded", "failed", "timed_out", "cancelled", "interrupted"]

RUN_FINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
JOB_FINAL: frozenset[str] = frozenset(
    {"succeeded", "failed", "timed_out", "cancelled", "skipped", "cached", "interrupted"}
)
JOB_PASSED: frozenset[str] = frozenset({"succeeded", "cached"})
"""A job in one of these statuses lets the jobs that need it run."""
