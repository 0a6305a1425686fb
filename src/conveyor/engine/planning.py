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


def uncached_sources(spec: PipelineSpec) -> dict[str, str]:
    """Jobs whose inputs include the result of a job that opts out of caching: name -> that job.

    A ``cache: false`` job does something different every time (that is why it opts out), so
    what depends on it (its dependants in the stage, and every later job when it publishes an
    artifact) cannot be taken from the cache either, though their keys are unchanged.
    """
    if all(job.cache for stage in spec.stages for job in stage.jobs):
        return {}  # the common case, without walking the graph
    found: dict[str, str] = {}
    earlier: str | None = None  # an uncached producer of an artifact of an earlier stage
    for stage in spec.stages:
        for name in topological_order({job.name: list(job.needs) for job in stage.jobs}):
            job = stage.job(name)
            source = earlier
            for need in job.needs:
                if source is not None:
                    break
                source = need if not stage.job(need).cache else found.get(need)
            if source is not None:
                found[name] = source
        if spec.artifacts and earlier is None:
            earlier = next(
                (
                    found.get(job.name, job.name)
                    for job in stage.jobs
                    if job.outputs and (not job.cache or job.name in found)
                ),
                None,
            )
    return found


def uncached_reason(source: str) -> str:
    """Why a job that depends on ``source`` (a ``cache: false`` job) is not taken from the cache."""
    return f"it depends on '{source}', which opts out of caching"


def job_decision(
    job: JobSpec,
    key: str,
    use_cache: bool,
    find_cache: Callable[[str], CacheHit | None],
    not_cacheable: str | None = None,
) -> tuple[str, str, CacheHit | None]:
    """Whether a job whose needs passed runs or is taken from the cache, and why
    (``not_cacheable`` says why the job cannot be taken from the cache, if it cannot)."""
    if not use_cache:
        return "run", "the cache is disabled for this run (--no-cache)", None
    if not job.cache:
        return "run", "the job opts out of caching (cache: false)", None
    if not_cacheable is not None:
        return "run", not_cacheable, None
    hit = find_cache(key)
    if hit is None:
        return "run", "no successful attempt with this cache key", None
    return "cached", f"same cache key as run {hit.run_id} (attempt {hit.attempt})", hit
