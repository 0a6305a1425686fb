"""Domain events: immutable, past-tense facts appended to the record.

Every state change of a run is one of these. The store appends them, hash-linked, in the same
transaction as the read models it derives from them. ``payload()`` is the stored form: plain JSON
values only, so the record can be verified and read without this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, eq=False, repr=False)
class Event:
    """Base of every event; ``kind`` is the stored event type."""

    kind: ClassVar[str] = "event"
    run_id: int

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"

    def payload(self) -> dict[str, Any]:
        """The event's fields as JSON-ready values (``run_id`` included)."""
        return dict(self.__dict__)


@dataclass(frozen=True, eq=False, repr=False)
class RunStarted(Event):
    """A run of a pipeline began on a revision."""

    kind: ClassVar[str] = "run.started"
    pipeline: str
    revision: str
    pipeline_file: str
    pipeline_digest: str
    dirty: bool
    actor: str
    stages: list[dict[str, Any]]
    """``[{"name": stage, "jobs": [job, ...]}, ...]`` in order."""
    owner: dict[str, Any]
    """Who executes the run: ``pid``, ``host`` and ``token`` (to find orphaned processes)."""
    options: dict[str, Any] = field(default_factory=dict)
    branch: str = ""
    """The branch the revision was taken from (``""``: a commit, a tag or a detached HEAD)."""


@dataclass(frozen=True, eq=False, repr=False)
class StageStarted(Event):
    """A stage began (its gates, if any, are evaluated next)."""

    kind: ClassVar[str] = "stage.started"
    stage: str


@dataclass(frozen=True, eq=False, repr=False)
class StageFinished(Event):
    """A stage ended, with its status (and for a deploy stage, why)."""

    kind: ClassVar[str] = "stage.finished"
    stage: str
    status: str
    reason: str = ""
    """Why a deploy stage ended as it did (the deployment's outcome)."""


@dataclass(frozen=True, eq=False, repr=False)
class JobSkipped(Event):
    """A job did not run: the line stopped, a job it needs failed, or it was not selected."""

    kind: ClassVar[str] = "job.skipped"
    stage: str
    job: str
    reason: str


@dataclass(frozen=True, eq=False, repr=False)
class JobCached(Event):
    """A job's cache key matched a successful attempt; it was not run again."""

    kind: ClassVar[str] = "job.cached"
    stage: str
    job: str
    cache_key: str
    source_run: int
    source_job: str
    source_attempt: int


@dataclass(frozen=True, eq=False, repr=False)
class JobAttemptStarted(Event):
    """An attempt of a job was recorded as started; its process is spawned after the commit."""

    kind: ClassVar[str] = "job.attempt.started"
    stage: str
    job: str
    attempt: int
    cache_key: str
    log: str
    """Path of the attempt's log file, relative to Conveyor's home."""


@dataclass(frozen=True, eq=False, repr=False)
class JobAttemptFinished(Event):
    """An attempt ended and the job will be retried (the last attempt's end is in
    ``JobFinished.attempt``: one event less per job)."""

    kind: ClassVar[str] = "job.attempt.finished"
    stage: str
    job: str
    attempt: int
    status: str
    exit_code: int | None
    pid: int | None
    duration_s: float
    log_bytes: int
    log_sha256: str
    log_truncated: bool


@dataclass(frozen=True, eq=False, repr=False)
class TestsReported(Event):
    """Per-test results parsed from an attempt's JUnit reports."""

    kind: ClassVar[str] = "job.tests.reported"
    stage: str
    job: str
    attempt: int
    passed: int
    failed: int
    skipped: int
    tests: list[dict[str, Any]]
    """``{"name", "classname", "file", "outcome", "duration_s", "message"}`` per test case
    (``duration_s`` is ``None`` when the report's value was unusable)."""
    problems: list[str] = field(default_factory=list)
    truncated: bool = False
    """Whether test cases were left out (too many, or too many bytes of reports)."""


@dataclass(frozen=True, eq=False, repr=False)
class JobFinished(Event):
    """A job reached its final status (its last attempt is folded in as ``attempt``)."""

    kind: ClassVar[str] = "job.finished"
    stage: str
    job: str
    status: str
    exit_code: int | None
    attempts: int
    duration_s: float
    cache_key: str
    attempt: dict[str, Any] | None = None
    """How the last attempt ended: the fields of ``job.attempt.finished`` (``attempt``,
    ``status``, ``exit_code``, ``pid``, ``duration_s``, ``log_bytes``, ``log_sha256``,
    ``log_truncated``)."""


@dataclass(frozen=True, eq=False, repr=False)
class ArtifactPublished(Event):
    """A job's declared output is in the artifact store, with its signed provenance.

    For a cached job the bytes and the provenance are those of the run that built them
    (``source_run``): an artifact is built once.
    """

    kind: ClassVar[str] = "artifact.published"
    stage: str
    job: str
    name: str
    artifact_kind: str
    """``file`` or ``dir``."""
    digest: str
    size: int
    path: str
    """Where the job wrote it, relative to the workspace."""
    provenance: str
    """The DSSE envelope (JSON text) of the in-toto provenance statement, as signed."""
    source_run: int | None = None


@dataclass(frozen=True, eq=False, repr=False)
class ReportRecorded(Event):
    """A job's declared coverage or metrics report, as read after it succeeded."""

    kind: ClassVar[str] = "job.report.recorded"
    stage: str
    job: str
    report: str
    """``coverage`` (``data``: ``{"percent": n}``) or ``metrics`` (``data``: name -> number)."""
    path: str
    data: dict[str, Any]


@dataclass(frozen=True, eq=False, repr=False)
class GateEvaluated(Event):
    """A gate's verdict with its evidence, before a stage or a deployment.

    ``verdict`` is ``passed``, ``failed`` or ``overridden`` (failed, but an unexpired override
    for this gate, digest and environment lets it pass: ``override_id``).
    """

    kind: ClassVar[str] = "gate.evaluated"
    environment: str
    stage: str
    digest: str
    gate: str
    gate_kind: str
    verdict: str
    summary: str
    evidence: dict[str, Any]
    override_id: int | None = None


@dataclass(frozen=True, eq=False, repr=False)
class RunFinished(Event):
    """A run ended: ``succeeded``, ``failed`` or ``cancelled``."""

    kind: ClassVar[str] = "run.finished"
    status: str
    reason: str = ""


@dataclass(frozen=True, eq=False, repr=False)
class RunInterrupted(Event):
    """The process executing the run died; a later command found the run orphaned."""

    kind: ClassVar[str] = "run.interrupted"
    reason: str
    killed_pids: list[int] = field(default_factory=list)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        RunStarted,
        StageStarted,
        StageFinished,
        JobSkipped,
        JobCached,
        JobAttemptStarted,
        JobAttemptFinished,
        TestsReported,
        JobFinished,
        ArtifactPublished,
        ReportRecorded,
        GateEvaluated,
        RunFinished,
        RunInterrupted,
    )
}
