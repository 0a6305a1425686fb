"""``conveyor plan``: what a run would do and why, without running anything (pure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from conveyor.domain.ports import CacheHit, SourceSnapshot
from conveyor.engine.planning import job_decision, uncached_reason, uncached_sources
from conveyor.spec.graph import dag_levels
from conveyor.spec.models import PipelineSpec


@dataclass(frozen=True)
class PlannedJob:
    """One job in the plan and why it will (or will not) run."""

    name: str
    needs: tuple[str, ...]
    cache_key: str
    action: str
    """``run``, ``cached`` or ``skip``."""
    reason: str
    cache_hit: CacheHit | None = None


@dataclass(frozen=True)
class PlannedDeploy:
    """What a deploy stage will do."""

    environment: str
    artifact: str
    target: str
    requires: tuple[str, ...]
    branches: tuple[str, ...]


@dataclass(frozen=True)
class PlannedStage:
    name: str
    selected: bool
    levels: list[list[PlannedJob]]
    deploy: PlannedDeploy | None = None


@dataclass(frozen=True)
class Plan:
    pipeline: str
    revision: str
    stages: list[PlannedStage]


def build_plan(
    spec: PipelineSpec,
    source: SourceSnapshot,
    keys: Mapping[str, str],
    *,
    selected: Sequence[str] | None,
    use_cache: bool,
    find_cache: Callable[[str], CacheHit | None],
) -> Plan:
    """Stages, DAG levels and the decision for each job, assuming every job succeeds."""
    stages: list[PlannedStage] = []
    uncached = uncached_sources(spec)
    lacking: str | None = None  # why later jobs will run without some artifacts
    for stage in spec.stages:
        chosen = selected is None or stage.name in selected
        levels: list[list[PlannedJob]] = []
        for level in dag_levels({job.name: list(job.needs) for job in stage.jobs}):
            row: list[PlannedJob] = []
            for name in level:
                job = stage.job(name)
                if chosen:
                    depends_on = uncached.get(name)
                    action, reason, hit = job_decision(
                        job,
                        keys[name],
                        use_cache,
                        find_cache,
                        lacking or (uncached_reason(depends_on) if depends_on else None),
                    )
                else:
                    action, reason, hit = "skip", "stage not selected (--stage)", None
                    if job.outputs and lacking is None:
                        would, _, _ = job_decision(
                            job,
                            keys[name],
                            use_cache,
                            find_cache,
                            uncached_reason(depends_on)
                            if (depends_on := uncached.get(name))
                            else None,
                        )
                        if would != "cached":  # the engine reuses them only from the cache
                            names = ", ".join(f"'{a}'" for a in job.outputs)
                            lacking = f"artifacts {names} will not be available to this run"
                            reason = (
                                "stage not selected (--stage); its artifacts are in no cache:"
                                " later jobs will run without them"
                            )
                row.append(PlannedJob(name, job.needs, keys[name], action, reason, hit))
            levels.append(row)
        deploy = None
        if stage.deploy is not None:
            environment = spec.environment(stage.deploy.environment)
            deploy = PlannedDeploy(
                environment.name,
                stage.deploy.artifact,
                environment.target.type,
                environment.requires,
                environment.branches,
            )
        stages.append(PlannedStage(stage.name, chosen, levels, deploy))
    return Plan(spec.name, source.revision, stages)
