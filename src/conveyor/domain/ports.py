"""The small interfaces through which the engine reaches the outside world.

Adapters implement them (``executors.local``, ``store.sqlite``, ``adapters.*``); tests use
in-memory fakes. Only ``bootstrap`` names concrete classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from conveyor.domain.events import Event

if TYPE_CHECKING:
    from conveyor.domain.delivery import ArtifactRecord


@dataclass(frozen=True, eq=False)
class CacheHit:
    """A successful earlier attempt with the same cache key."""

    run_id: int
    job: str
    attempt: int


@dataclass(frozen=True, eq=False)
class SourceSnapshot:
    """The files of the revision a run works on, for cache keys.

    ``files`` maps each path to its mode and content id (``100755:<git blob id>``, or a sha256
    for a dirty tree), so that a changed executable bit changes the keys of the jobs using it;
    ``tree_id`` identifies the whole tree.
    """

    revision: str
    tree_id: str
    files: Mapping[str, str] = field(default_factory=dict)
    dirty: bool = False


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

    def sweep(self) -> list[int]:
        """Kill what ended attempts left running outside their process group (a background
        process that started its own group or session); returns the pids killed."""
        ...

    def close(self) -> None:
        """Release every resource; kill whatever still runs, strays included."""
        ...


@dataclass(frozen=True, eq=False)
class LogSummary:
    """What was stored of one attempt's output."""

    path: str
    size: int
    sha256: str
    truncated: bool
    problem: str = ""
    """Why the output could not be stored (the log file existed already); ``""`` if it was."""


class AttemptLog(Protocol):
    """The durable log of one attempt."""

    path: str
    problem: str
    """Why this log cannot be written (its file exists already): the attempt then fails."""

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
    duration_s: float | None
    """Seconds; ``None`` when the report's value is unusable (not a finite number >= 0)."""
    message: str = ""


@dataclass(frozen=True, eq=False)
class ReportResult:
    """Every test case found in a job's reports, and the problems met reading them."""

    tests: list[TestCaseResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    truncated: bool = False
    """Whether test cases were left out because of the caps on count or size."""


class ReportReader(Protocol):
    """Reads test reports that a job left in its workspace."""

    def read_junit(self, workspace: str, patterns: Sequence[str]) -> ReportResult:
        """Parse every file under ``workspace`` matching ``patterns``."""
        ...

    def read_report(self, workspace: str, kind: str, path: str) -> dict[str, Any]:
        """A ``coverage`` report (``{"percent": n}``, from Cobertura XML) or a ``metrics`` file
        (dotted name -> number) at ``path``; ``ConveyorError`` if missing or invalid."""
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
