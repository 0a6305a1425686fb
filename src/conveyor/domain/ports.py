"""The small interfaces through which the engine reaches the outside world.

Adapters implement them (``executors.local``, ``store.sqlite``, ``adapters.*``); tests use
in-memory fakes. Only ``bootstrap`` names concrete classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from conveyor.domain.events import Event
from conveyor.spec.models import EnvironmentSpec, StageSpec


@dataclass(frozen=True, eq=False)
class CacheHit:
    """A successful earlier attempt with the same cache key."""

    run_id: int
    job: str
    attempt: int


@dataclass(frozen=True, eq=False)
class SourceSnapshot:
    """The files of the revision a run works on, for cache keys.

    ``files`` maps each path to a content id (a git blob id, or a sha256 for a dirty tree);
    ``tree_id`` identifies the whole tree.
    """

    revision: str
    tree_id: str
    files: Mapping[str, str] = field(default_factory=dict)
    dirty: bool = False


@dataclass(frozen=True)
class ArtifactRecord:
    """An artifact a job of a run published (what the record says about it)."""

    name: str
    kind: str
    digest: str
    size: int
    path: str
    provenance: str
    job: str
    run_id: int


class RecordWriter(Protocol):
    """The engine's side of the record: append events, find cache hits."""

    def allocate_run_id(self) -> int:
        """A new, unique run id."""
        ...

    def append(self, events: Sequence[Event]) -> None:
        """Append ``events`` durably, hash-linked, with their read models, in one transaction."""
        ...

    def find_cache(self, cache_key: str) -> CacheHit | None:
        """The most recent successful attempt with ``cache_key``, if any."""
        ...

    def job_artifacts(self, run_id: int, job: str) -> list[ArtifactRecord]:
        """The artifacts ``job`` published in run ``run_id`` (to reuse them on a cache hit)."""
        ...


@dataclass(frozen=True, eq=False)
class JobLaunch:
    """What an executor needs to start one attempt of a job."""

    key: str
    """Identifies the attempt in executor events (``job#attempt``)."""
    script: str
    env: Mapping[str, str]
    cwd: str


@dataclass(frozen=True, eq=False)
class Output:
    """Bytes a job wrote to stdout or stderr (merged, in order)."""

    key: str
    data: bytes


@dataclass(frozen=True, eq=False)
class Exited:
    """A job's main process ended; ``exit_code`` is negative for a signal."""

    key: str
    exit_code: int


ExecutorEvent = Output | Exited


class Executor(Protocol):
    """Runs job attempts and reports what they do."""

    def start(self, launch: JobLaunch) -> int:
        """Start an attempt; returns its process (group) id."""
        ...

    def poll(self, timeout: float | None) -> list[ExecutorEvent]:
        """Wait up to ``timeout`` seconds for output or exits; returns what happened, in order.

        Returns early (possibly with nothing) when the executor is woken (a signal arrived).
        """
        ...

    def kill(self, key: str, *, force: bool) -> None:
        """Terminate the attempt's whole process group (SIGTERM, or SIGKILL if ``force``)."""
        ...

    def close(self) -> None:
        """Release every resource; kill whatever still runs."""
        ...


@dataclass(frozen=True, eq=False)
class LogSummary:
    """What was stored of one attempt's output."""

    path: str
    size: int
    sha256: str
    truncated: bool


class AttemptLog(Protocol):
    """The durable log of one attempt."""

    path: str

    def write(self, data: bytes) -> None:
        """Append (already masked) output; beyond the cap it is dropped with a mark."""
        ...

    def close(self) -> LogSummary:
        """Flush and close; the summary goes into the record."""
        ...


class LogStore(Protocol):
    """Where attempt logs are kept."""

    def open_attempt(self, run_id: int, job: str, attempt: int) -> AttemptLog:
        """A new, empty log for one attempt."""
        ...


@dataclass(frozen=True, eq=False)
class TestCaseResult:
    """One test case from a JUnit report."""

    name: str
    classname: str
    file: str
    outcome: str
    """``passed``, ``failed``, ``error`` or ``skipped``."""
    duration_s: float
    message: str = ""


@dataclass(frozen=True, eq=False)
class ReportResult:
    """Every test case found in a job's reports, and the problems met reading them."""

    tests: list[TestCaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class ReportReader(Protocol):
    """Reads test reports that a job left in its workspace."""

    def read_junit(self, workspace: str, patterns: Sequence[str]) -> ReportResult:
        """Parse every file under ``workspace`` matching ``patterns``."""
        ...

    def read_report(self, workspace: str, kind: str, path: str) -> dict[str, Any]:
        """A ``coverage`` report (``{"percent": n}``, from Cobertura XML) or a ``metrics`` file
        (dotted name -> number) at ``path``; ``ConveyorError`` if missing or invalid."""
        ...


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict as a stage sees it (``status``: passed or failed)."""

    gate: str
    kind: str
    status: str
    summary: str
    evidence: Mapping[str, Any]


class StageGates(Protocol):
    """Evaluates a stage's gates on what the run recorded so far."""

    def check(self, stage: StageSpec, run_id: int) -> list[GateResult]:
        """Every gate of ``stage``, in order."""
        ...


@dataclass(frozen=True)
class StoredBlob:
    """Bytes in the content-addressed store: ``sha256:<hex>`` and their size."""

    digest: str
    size: int


class ArtifactStore(Protocol):
    """Content-addressed artifact bytes (sha256), local by default; S3/OCI can implement it.

    ``kind`` is ``file`` (the bytes of one file) or ``dir`` (a canonical tar of a directory:
    sorted entries, normalised times, owners and modes, so equal trees have equal digests).
    Every method raises ``ArtifactError`` with a clear message for hostile or corrupt input.
    """

    def publish(self, root: str, rel_path: str, kind: str) -> StoredBlob:
        """Store the file or directory at ``rel_path`` under ``root`` (it may not leave it)."""
        ...

    def has(self, digest: str) -> bool:
        """Whether the store holds ``digest``."""
        ...

    def export(self, digest: str, kind: str, dest: str) -> None:
        """Write the verified bytes to ``dest``: the file, or the directory's contents."""
        ...


class Attestor(Protocol):
    """Signs provenance statements with this Conveyor instance's key (never given to jobs)."""

    @property
    def builder_id(self) -> str:
        """The URI naming this instance as the builder in provenance."""
        ...

    def attest(self, statement: Mapping[str, Any]) -> str:
        """The DSSE envelope (JSON text) of the signed in-toto ``statement``."""
        ...


@dataclass(frozen=True)
class Release:
    """One artifact digest made ready for an environment by a deployment.

    ``folder`` is the release folder (``environments/<env>/releases/<deployment>``): for a
    directory artifact or a tar archive it holds the unpacked contents at its root; any other
    file is placed in it as is. ``artifact_path`` is that file, or ``folder`` itself.
    """

    environment: str
    deployment_id: int
    artifact: str
    digest: str
    folder: str
    artifact_path: str
    revision: str


@dataclass(frozen=True)
class Health:
    """The verdict of a health check, with what was observed."""

    ok: bool
    detail: str


class Target(Protocol):
    """How an environment is deployed to (a local process, user scripts...).

    The deployment strategy (for now *recreate*, with automatic rollback) is in the caller;
    a target only knows how to start, check, stop and restore releases. Every method raises
    ``DeployError`` with a clear message when it cannot do its part.
    """

    def start(self, release: Release, previous: Release | None) -> None:
        """Put ``release`` in place of ``previous`` (which the caller has stopped)."""
        ...

    def check(self, release: Release, timeout_s: float) -> Health:
        """Wait up to ``timeout_s`` for ``release`` to be healthy."""
        ...

    def stop(self, release: Release) -> None:
        """Stop ``release`` if it runs (idempotent)."""
        ...

    def restore(self, previous: Release, failed: Release) -> None:
        """Bring ``previous`` back after ``failed`` proved unhealthy (and was stopped)."""
        ...

    def describe(self, release: Release) -> dict[str, Any]:
        """What runs now for ``release``: ``running`` (bool), and ``url``, ``pid`` if known."""
        ...


@dataclass(frozen=True)
class DeploymentOutcome:
    """How a deployment ended: ``succeeded``, ``failed`` or ``rolled_back``."""

    deployment_id: int
    status: str
    reason: str
    health: str


class Deployments(Protocol):
    """Deploys verified artifacts to environments (policy, lease, strategy, record)."""

    def deploy(
        self,
        environment: EnvironmentSpec,
        item: ArtifactRecord,
        *,
        revision: str,
        actor: str,
        trigger: str,
        hotfix: bool = False,
    ) -> DeploymentOutcome:
        """Deploy ``item``; raises ``DeployError`` if a policy refuses it (nothing changed)."""
        ...


class Workspace(Protocol):
    """The clean checkout a run's jobs work in; prepared on first use."""

    def path(self) -> str:
        """The workspace directory, checking out the revision the first time."""
        ...


class Clock(Protocol):
    """Wall and monotonic time."""

    def now(self) -> str:
        """Current UTC time, ISO 8601 with microseconds and ``Z``."""
        ...

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going back."""
        ...


class Observer(Protocol):
    """Receives what happens during a run, for live feedback (terminal, later the web UI)."""

    def on_event(self, event: Event) -> None:
        """An event was recorded."""
        ...

    def on_output(self, job: str, attempt: int, text: str) -> None:
        """A job wrote (masked) output."""
        ...

    def on_note(self, text: str) -> None:
        """A step of work that is not a job's (a deployment's progress)."""
        ...


class CancelToken(Protocol):
    """Tells the engine that the user asked to cancel the run."""

    def is_set(self) -> bool:
        """Whether cancellation was requested."""
        ...


JsonDict = dict[str, Any]
