"""What a run will do, computed without running anything (pure).

Used by the engine to decide what runs and by ``conveyor plan`` to explain it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

from conveyor.domain.cachekey import inputs_digest, job_cache_key
from conveyor.domain.ports import CacheHit, SourceSnapshot
from conveyor.spec.graph import topological_order
from conveyor.spec.models import JobSpec, PipelineSpec


def secret_digests(secrets: Mapping[str, str]) -> dict[str, str]:
    """Digests of secret values: a changed secret changes the key without being stored."""
    return {name: hashlib.sha256(value.encode()).hexdigest() for name, value in secrets.items()}


def cache_keys(
    spec: PipelineSpec, source: SourceSnapshot, secrets: Mapping[str, str]
) -> dict[str, str]:
    """The cache key of every job of the pipeline."""
    digests = secret_digests(secrets)
    keys: dict[str, str] = {}
    inputs_memo: dict[tuple[str, ...] | None, str] = {}
    earlier: dict[str, str] = {}  # artifact -> key of its producer, for earlier stages
    for stage in spec.stages:
        edges = {job.name: list(job.needs) for job in stage.jobs}
        received: dict[str, dict[str, str]] = {}  # job -> artifacts it receives in the stage
        for name in topological_order(edges):
            job = stage.job(name)
            patterns = job.inputs
            if patterns not in inputs_memo:
                inputs_memo[patterns] = inputs_digest(source.files, patterns, source.tree_id)
            from_needs: dict[str, str] = {}
            if spec.artifacts:  # what the job receives through its needs (none without artifacts)
                for need in job.needs:
                    from_needs.update(received[need])
                    from_needs.update(dict.fromkeys(stage.job(need).outputs, keys[need]))
            received[name] = from_needs
            keys[name] = job_cache_key(
                script=job.run,
                env={**spec.env, **job.env},
                secret_digests=digests,
                needs_keys={need: keys[need] for need in job.needs},
                inputs=inputs_memo[patterns],
                outputs={
                    out: [spec.artifact(out).path, spec.artifact(out).kind] for out in job.outputs
                },
                artifact_keys={**earlier, **from_needs},
            )
        for job in stage.jobs:
            earlier.update({out: keys[job.name] for out in job.outputs})
    return keys


def job_decision(
    job: JobSpec, key: str, use_cache: bool, find_cache: Callable[[str], CacheHit | None]
) -> tuple[str, str, CacheHit | None]:
    """Whether a job whose needs passed runs or is taken from the cache, and why."""
    if not use_cache:
        return "run", "the cache is disabled for this run (--no-cache)", None
    if not job.cache:
        return "run", "the job opts out of caching (cache: false)", None
    hit = find_cache(key)
    if hit is None:
        return "run", "no successful attempt with this cache key", None
    return "cached", f"same cache key as run {hit.run_id} (attempt {hit.attempt})", hit
