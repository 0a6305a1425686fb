"""The pipeline definition as typed, immutable values (what ``conveyor.yml`` declares).

Definitions are named ``*Spec``; their executions (``JobRun`` and friends) live in
``conveyor.domain``. Every spec value remembers where it was declared so that later checks and
messages can point at ``file:line:column``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

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


TARGET_TYPES = ("process", "command")
DEFAULT_HEALTH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TargetSpec:
    """How an environment is deployed to.

    ``process``: ``command`` runs the release as a local service; health by ``health_http``
    (a path on ``$PORT``) or ``health_command``. ``command``: the user's ``deploy``, ``health``
    and ``rollback`` scripts.
    """

    type: str
    command: str = ""
    health_http: str | None = None
    health_command: str | None = None
    deploy: str = ""
    rollback: str | None = None


GATE_KINDS = ("tests", "coverage", "metric", "approval", "window")
STAGE_GATE_KINDS = ("tests", "coverage", "metric", "window")
DEFAULT_OVERRIDE_ROLES = ("overrider", "admin")
DEFAULT_OVERRIDE_EXPIRY_S = 2 * 3600.0
DEFAULT_OVERRIDE_MAX_S = 24 * 3600.0


@dataclass(frozen=True)
class GateSpec:
    """An automated check before a stage or a deployment; ``params`` are the kind's settings
    (validated, JSON values), e.g. ``{"min_passed_ratio": 1.0, "min_count": 50}``."""

    name: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    location: Location = Location(1, 1)


@dataclass(frozen=True)
class EnvironmentSpec:
    """A place the software runs, with its target and the policy for what it accepts."""

    name: str
    target: TargetSpec
    requires: tuple[str, ...] = ()
    """Stages that must have passed in the run that built the artifact."""
    branches: tuple[str, ...] = ()
    """Glob patterns of the branches whose builds it accepts (empty: any)."""
    port: int | None = None
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S
    gates: tuple[GateSpec, ...] = ()
    override_roles: tuple[str, ...] = DEFAULT_OVERRIDE_ROLES
    override_expiry_s: float = DEFAULT_OVERRIDE_EXPIRY_S
    """The expiry of an override when ``--expires`` is not given."""
    override_max_s: float = DEFAULT_OVERRIDE_MAX_S
    override_confirm: bool = False
    """Whether an override needs a second person's ``--confirm``."""
    location: Location = Location(1, 1)


@dataclass(frozen=True)
class DeploySpec:
    """A deploy stage: put ``artifact`` (built earlier in the run) into ``environment``."""

    environment: str
    artifact: str
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
        """A JSON-ready form, read back by ``from_dict`` (used to cache parsed files)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineSpec:
        """The pipeline ``to_dict`` produced."""
        stages = []
        for stage in data["stages"]:
            jobs = tuple(
                JobSpec(
                    **{
                        **job,
                        "needs": tuple(job["needs"]),
                        "junit": tuple(job["junit"]),
                        "inputs": None if job["inputs"] is None else tuple(job["inputs"]),
                        "outputs": tuple(job["outputs"]),
                        "location": Location(**job["location"]),
                    }
                )
                for job in stage["jobs"]
            )
            deploy = stage.get("deploy")
            stages.append(
                StageSpec(
                    stage["name"],
                    jobs,
                    Location(**stage["location"]),
                    None
                    if deploy is None
                    else DeploySpec(**{**deploy, "location": Location(**deploy["location"])}),
                    tuple(_gate(g) for g in stage["gates"]),
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
            environments=tuple(
                EnvironmentSpec(
                    **{
                        **e,
                        "target": TargetSpec(**e["target"]),
                        "requires": tuple(e["requires"]),
                        "branches": tuple(e["branches"]),
                        "gates": tuple(_gate(g) for g in e["gates"]),
                        "override_roles": tuple(e["override_roles"]),
                        "location": Location(**e["location"]),
                    }
                )
                for e in data["environments"]
            ),
        )


def _gate(data: dict[str, Any]) -> GateSpec:
    return GateSpec(data["name"], data["kind"], dict(data["params"]), Location(**data["location"]))
