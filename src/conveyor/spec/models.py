"""The pipeline definition as typed, immutable values (what ``conveyor.yml`` declares).

Definitions are named ``*Spec``; their executions (``JobRun`` and friends) live in
``conveyor.domain``. Every spec value remembers where it was declared so that later checks and
messages can point at ``file:line:column``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.spec.delivery import DeploySpec, EnvironmentSpec, GateSpec

DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_FILE = "conveyor.yml"


@dataclass(frozen=True)
class Location:
    """Where a value was declared (1-based line and column)."""

    line: int
    column: int


ARTIFACT_KINDS = ("file", "dir")


@dataclass(frozen=True)
class ArtifactSpec:
    """A named output built once: a file or a directory at ``path`` in the workspace."""

    name: str
    path: str
    kind: str = "file"
    """``file`` or ``dir`` (stored as a canonical tar)."""
    location: Location = Location(1, 1)

    @property
    def env_name(self) -> str:
        """``CONVEYOR_ARTIFACT_<NAME>``: upper-cased, ``-`` as ``_``."""
        return "CONVEYOR_ARTIFACT_" + self.name.upper().replace("-", "_")


@dataclass(frozen=True)
class JobSpec:
    """One job: a shell script run with ``bash -e`` in the run's workspace."""

    name: str
    stage: str
    run: str
    needs: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = 0
    junit: tuple[str, ...] = ()
    """Globs (relative to the workspace) of JUnit XML reports to parse after each attempt."""
    inputs: tuple[str, ...] | None = None
    """Glob patterns of the files the cache key covers; ``None`` means the whole tree."""
    cache: bool = True
    allow_failure: bool = False
    outputs: tuple[str, ...] = ()
    """Names of the artifacts the job publishes when it succeeds."""
    coverage: str | None = None
    """A Cobertura XML report the job writes (workspace-relative), recorded for gates."""
    metrics: str | None = None
    """A JSON file of numbers the job writes (workspace-relative), recorded for gates."""
    location: Location = Location(1, 1)


@dataclass(frozen=True)
class StageSpec:
    """A step of the sequence: jobs forming a DAG through ``needs``, or one deployment."""

    name: str
    jobs: tuple[JobSpec, ...]
    location: Location = Location(1, 1)
    deploy: DeploySpec | None = None
    gates: tuple[GateSpec, ...] = ()

    def job(self, name: str) -> JobSpec:
        """The job called ``name`` in this stage (``KeyError`` if there is none)."""
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, JobSpec]:
        return {job.name: job for job in self.jobs}


@dataclass(frozen=True)
class PipelineSpec:
    """A whole pipeline file, validated."""

    name: str
    stages: tuple[StageSpec, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    source: str = DEFAULT_FILE
    digest: str = ""
    """``sha256:<hex>`` of the file's bytes, recorded with every run."""
    artifacts: tuple[ArtifactSpec, ...] = ()
    environments: tuple[EnvironmentSpec, ...] = ()

    def environment(self, name: str) -> EnvironmentSpec:
        """The environment called ``name`` (``KeyError`` if there is none)."""
        for environment in self.environments:
            if environment.name == name:
                return environment
        raise KeyError(name)

    def artifact(self, name: str) -> ArtifactSpec:
        """The artifact called ``name`` (``KeyError`` if there is none)."""
        for artifact in self.artifacts:
            if artifact.name == name:
                return artifact
        raise KeyError(name)

    def producer(self, artifact: str) -> JobSpec | None:
        """The job that publishes ``artifact`` (at most one), if any."""
        for job in self.jobs:
            if artifact in job.outputs:
                return job
        return None

    @property
    def jobs(self) -> Iterator[JobSpec]:
        """Every job, stage by stage, in file order."""
        for stage in self.stages:
            yield from stage.jobs

    def job(self, name: str) -> JobSpec:
        """The job called ``name`` (job names are unique in a pipeline)."""
        for job in self.jobs:
            if job.name == name:
                return job
        raise KeyError(name)

    def stage(self, name: str) -> StageSpec:
        """The stage called ``name`` (``KeyError`` if there is none)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, read back by ``from_dict`` (used to cache parsed files).

        A job's fields that keep their default are left out: a pipeline of many small jobs
        is read back several times faster.
        """
        data = asdict(self)
        defaults = _job_defaults()
        for stage in data["stages"]:
            stage["jobs"] = [
                {k: v for k, v in job.items() if not _is_default(defaults, k, v)}
                for job in stage["jobs"]
            ]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineSpec:
        """The pipeline ``to_dict`` produced."""
        stages = []
        for stage in data["stages"]:
            jobs = tuple(_job_from_dict(job) for job in stage["jobs"])
            deploy = stage.get("deploy")
            stages.append(
                StageSpec(
                    stage["name"],
                    jobs,
                    Location(**stage["location"]),
                    None if deploy is None else _deploy(deploy),
                    _gates(stage["gates"]),
                )
            )
        return cls(
            name=data["name"],
            stages=tuple(stages),
            env=data["env"],
            secrets=tuple(data["secrets"]),
            source=data["source"],
            digest=data["digest"],
            artifacts=tuple(
                ArtifactSpec(**{**a, "location": Location(**a["location"])})
                for a in data["artifacts"]
            ),
            environments=_environments(data["environments"]),
        )


_JOB_DEFAULTS: dict[str, Any] = {}


def _job_defaults() -> dict[str, Any]:
    """``JobSpec``'s default field values, in ``asdict`` form."""
    if not _JOB_DEFAULTS:
        for f in fields(JobSpec):
            if f.default is not MISSING:
                value = f.default
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            else:
                continue
            _JOB_DEFAULTS[f.name] = asdict(value) if isinstance(value, Location) else value
    return _JOB_DEFAULTS


def _is_default(defaults: dict[str, Any], key: str, value: Any) -> bool:
    """Whether ``value`` is the field's default, type included (``3600`` is not ``3600.0``)."""
    return key in defaults and type(value) is type(defaults[key]) and value == defaults[key]


def _job_from_dict(data: dict[str, Any]) -> JobSpec:
    """A job as ``PipelineSpec.to_dict`` wrote it (fields left out keep their default)."""
    values = dict(data)
    for key in ("needs", "junit", "outputs"):
        if key in values:
            values[key] = tuple(values[key])
    if values.get("inputs") is not None:
        values["inputs"] = tuple(values["inputs"])
    if "location" in values:
        values["location"] = Location(**values["location"])
    return JobSpec(**values)


# Environments, gates and deploy stages are built only for pipelines that have them.


def _gates(items: list[dict[str, Any]]) -> tuple[GateSpec, ...]:
    if not items:
        return ()
    from conveyor.spec.delivery import gate_from_dict

    return tuple(gate_from_dict(g) for g in items)


def _deploy(data: dict[str, Any]) -> DeploySpec:
    from conveyor.spec.delivery import deploy_from_dict

    return deploy_from_dict(data)


def _environments(items: list[dict[str, Any]]) -> tuple[EnvironmentSpec, ...]:
    if not items:
        return ()
    from conveyor.spec.delivery import environment_from_dict

    return tuple(environment_from_dict(e) for e in items)
