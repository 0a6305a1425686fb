"""Evaluating gates against the record: the data each gate looks at, and overrides.

An environment's gates are evaluated for one artifact digest before a deployment (and by
``conveyor gates check``); a stage's gates before the stage starts, on what the run recorded so
far. The evaluators themselves are pure (``conveyor.domain.gates``); this module gathers their
inputs from the record:

- ``tests``: the JUnit counts of the run that built the digest (or of the current run);
- ``coverage``: the recorded Cobertura percentage of that run, and as the baseline the one of
  the run that built the digest the environment runs now;
- ``metric``: the recorded metrics file of that run;
- ``approval``: the approvals of this digest for this environment, and the revision's author;
- ``window``: the time of the check.

A failed gate passes as ``overridden`` when an override for that gate, digest and environment
is unexpired (and confirmed, if the environment asks for a second person).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import conveyor.domain.gates as g
from conveyor.domain.delivery import ArtifactRecord, GateResult
from conveyor.spec.delivery import EnvironmentSpec, GateSpec
from conveyor.spec.models import StageSpec


@dataclass(frozen=True)
class Outcome:
    """A gate's verdict, after overrides: ``passed``, ``failed`` or ``overridden``."""

    verdict: g.Verdict
    status: str
    override_id: int | None = None

    @property
    def blocks(self) -> bool:
        return self.status == "failed"


def evaluate_gate(
    gate: GateSpec,
    *,
    record: Any,
    run_id: int,
    environment: EnvironmentSpec | None,
    digest: str,
    at: datetime,
    authors: Callable[[], Sequence[str]],
) -> g.Verdict:
    """One gate's verdict on the data the record holds for ``run_id`` (and ``digest``)."""
    p = gate.params
    if gate.kind == "tests":
        counts = record.test_counts(run_id)
        return g.tests_gate(
            gate.name,
            passed=counts["passed"],
            failed=counts["failed"],
            skipped=counts["skipped"],
            min_passed_ratio=p["min_passed_ratio"],
            min_count=p["min_count"],
        )
    if gate.kind == "coverage":
        current = record.report_of(run_id, "coverage", p["report"])
        baseline = None
        if environment is not None:
            running = _running_run(record, environment.name)
            if running is not None:
                baseline = record.report_of(running, "coverage", p["report"])
        return g.coverage_gate(
            gate.name,
            current=current["percent"] if current else None,
            baseline=baseline["percent"] if baseline else None,
            min=p["min"],
            max_drop=p["max_drop"],
            report=p["report"],
        )
    if gate.kind == "metric":
        values = record.report_of(run_id, "metrics", p["file"])
        return g.metric_gate(gate.name, values=values, expr=p["expr"], file=p["file"])
    if gate.kind == "approval":
        assert environment is not None
        if p["not_author"]:
            facts = record.run_facts(run_id) or {}
            excluded = list(authors()) if not facts.get("dirty") else []
            if not excluded:
                # Fail closed: without a known author, "not the author" cannot be checked.
                why = (
                    "the build is of a dirty working tree: its author is unknown"
                    if facts.get("dirty")
                    else "the revision's author cannot be read from git"
                )
                return g.Verdict(
                    gate.name,
                    "approval",
                    False,
                    f"cannot check that approvers are not the author: {why}",
                    {"not_author": True, "required": p["count"], "role": p["role"]},
                )
        approvals = [
            g.Approval(a["approver"], tuple(a["roles"]), a["comment"], a["at"], a["digest"])
            for a in record.approvals_for(environment.name, digest)
        ]
        return g.approval_gate(
            gate.name,
            approvals=approvals,
            count=p["count"],
            role=p["role"],
            not_author=p["not_author"],
            authors=excluded if p["not_author"] else (),
        )
    if gate.kind == "window":
        return g.window_gate(
            gate.name,
            deny=g.parse_windows(p["deny"]),
            timezone=p["timezone"],
            at=at,
        )
    raise ValueError(f"unknown gate kind {gate.kind}")


def environment_gates(
    record: Any,
    environment: EnvironmentSpec,
    item: ArtifactRecord,
    *,
    at: datetime | None = None,
    now_epoch: float | None = None,
    authors: Callable[[], Sequence[str]] = lambda: (),
) -> list[Outcome]:
    """Every gate of ``environment`` for ``item``, overrides applied."""
    when = at or datetime.now(UTC)
    epoch = now_epoch if now_epoch is not None else when.timestamp()
    outcomes = []
    for gate in environment.gates:
        verdict = evaluate_gate(
            gate,
            record=record,
            run_id=item.run_id,
            environment=environment,
            digest=item.digest,
            at=when,
            authors=authors,
        )
        if verdict.passed:
            outcomes.append(Outcome(verdict, "passed"))
            continue
        override = usable_override(record, environment, item.digest, gate.name, epoch)
        if override is not None:
            outcomes.append(Outcome(verdict, "overridden", override["id"]))
        else:
            outcomes.append(Outcome(verdict, "failed"))
    return outcomes


def stage_gates(record: Any, gates: Sequence[GateSpec], run_id: int) -> list[Outcome]:
    """A stage's gates on what the run recorded so far (stage gates have no overrides)."""
    now = datetime.now(UTC)
    outcomes = []
    for gate in gates:
        verdict = evaluate_gate(
            gate,
            record=record,
            run_id=run_id,
            environment=None,
            digest="",
            at=now,
            authors=lambda: (),
        )
        outcomes.append(Outcome(verdict, "passed" if verdict.passed else "failed"))
    return outcomes


def usable_override(
    record: Any, environment: EnvironmentSpec, digest: str, gate: str, now_epoch: float
) -> dict[str, Any] | None:
    """The override that lets ``gate`` pass for ``digest`` now, if any."""
    for item in record.overrides_for(environment.name, digest, gate):
        if item["expires_epoch"] <= now_epoch:
            continue
        if item["needs_confirmation"] and not item["confirmed_by"]:
            continue
        return dict(item)
    return None


def _running_run(record: Any, environment: str) -> int | None:
    """The run that built what the environment runs now."""
    state = record.environment_state(environment)
    if not state or state["deployment"] is None:
        return None
    row = record.deployment(state["deployment"])
    return int(row["run"]) if row else None


class RecordStageGates:
    """The engine's ``StageGates``: a stage's gates on the record of the current run."""

    def __init__(self, record: Any) -> None:
        self.record = record

    def check(self, stage: StageSpec, run_id: int) -> list[GateResult]:
        return [
            GateResult(
                o.verdict.gate, o.verdict.kind, o.status, o.verdict.summary, o.verdict.evidence
            )
            for o in stage_gates(self.record, stage.gates, run_id)
        ]
