"""Hand-written fakes of the engine's ports, for unit tests of the core."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.domain import events as ev
from conveyor.domain.delivery import ArtifactRecord, StoredBlob
from conveyor.domain.ports import (
    CacheHit,
    ExecutorEvent,
    Exited,
    JobLaunch,
    LogSummary,
    Output,
    ReportResult,
)
from conveyor.errors import ArtifactError


class InMemoryRecord:
    """RecordWriter keeping events in a list; the cache is derived from JobFinished events."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self.commits: list[list[ev.Event]] = []
        self._next_id = 0
        self.cache: dict[str, CacheHit] = {}

    def allocate_run_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def append(self, events: Sequence[ev.Event]) -> None:
        self.commits.append(list(events))
        self.events.extend(events)
        for event in events:
            if isinstance(event, ev.JobFinished) and event.status == "succeeded":
                self.cache[event.cache_key] = CacheHit(event.run_id, event.job, event.attempts)

    def find_cache(self, cache_key: str) -> CacheHit | None:
        return self.cache.get(cache_key)

    def job_artifacts(self, run_id: int, job: str) -> list[ArtifactRecord]:
        return [
            ArtifactRecord(
                e.name, e.artifact_kind, e.digest, e.size, e.path, e.provenance, e.job, e.run_id
            )
            for e in self.events
            if isinstance(e, ev.ArtifactPublished) and e.run_id == run_id and e.job == job
        ]

    def of(self, kind: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]


@dataclass
class Script:
    """What a fake job does: output, then exit with ``code`` after ``ticks`` polls."""

    code: int = 0
    output: list[bytes] = field(default_factory=list)
    ticks: int = 1
    hang: bool = False


class FakeExecutor:
    """Executor that plays scripted behaviour; time advances through the FrozenClock."""

    def __init__(self, clock: FrozenClock, scripts: dict[str, list[Script]] | None = None) -> None:
        self.clock = clock
        self.scripts = scripts or {}
        self.running: dict[str, tuple[Script, int]] = {}
        self.started: list[JobLaunch] = []
        self.killed: list[tuple[str, bool]] = []
        self.max_concurrent = 0
        self.closed = False
        self.sweeps = 0
        self._pid = 1000

    def start(self, launch: JobLaunch) -> int:
        job, attempt = launch.key.split("#")
        plays = self.scripts.get(job, [Script()])
        script = plays[min(int(attempt), len(plays)) - 1]
        self.running[launch.key] = (script, 0)
        self.started.append(launch)
        self.max_concurrent = max(self.max_concurrent, len(self.running))
        self._pid += 1
        return self._pid

    def poll(self, timeout: float | None) -> list[ExecutorEvent]:
        out: list[ExecutorEvent] = []
        self.clock.advance(min(timeout or 1.0, 1.0))
        for key, (script, tick) in list(self.running.items()):
            tick += 1
            if tick == 1:
                out.extend(Output(key, chunk) for chunk in script.output)
            if not script.hang and tick >= script.ticks:
                out.append(Exited(key, script.code))
                del self.running[key]
            else:
                self.running[key] = (script, tick)
        return out

    def kill(self, key: str, *, force: bool) -> None:
        self.killed.append((key, force))
        if key in self.running:
            # The process dies at once; its exit shows on the next poll.
            self.running[key] = (Script(code=-9 if force else -15, ticks=1), 0)

    def sweep(self) -> list[int]:
        self.sweeps += 1
        return []

    def close(self) -> None:
        self.closed = True


class FrozenClock:
    def __init__(self) -> None:
        self.t = 100.0

    def now(self) -> str:
        moment = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.t)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def monotonic(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class MemoryLog:
    def __init__(self, path: str) -> None:
        self.path = path
        self.data = b""
        self.problem = ""

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> LogSummary:
        return LogSummary(self.path, len(self.data), "0" * 64, False)


class MemoryLogStore:
    def __init__(self) -> None:
        self.logs: dict[tuple[str, int], MemoryLog] = {}

    def open_attempt(self, run_id: int, job: str, attempt: int) -> MemoryLog:
        log = MemoryLog(f"logs/{run_id}/{job}.{attempt}.log")
        self.logs[(job, attempt)] = log
        return log


class NoReports:
    def __init__(self) -> None:
        self.reports: dict[tuple[str, str], dict[str, Any]] = {}

    def read_junit(self, workspace: str, patterns: Sequence[str]) -> ReportResult:
        return ReportResult()

    def read_report(self, workspace: str, kind: str, path: str) -> dict[str, Any]:
        if (kind, path) not in self.reports:
            raise ArtifactError(f"{kind} report {path} cannot be read")
        return self.reports[(kind, path)]


class FixedWorkspace:
    def path(self) -> str:
        return "/workspace"


class RecordingObserver:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []
        self.output: list[tuple[str, str]] = []

    def on_event(self, event: ev.Event) -> None:
        self.events.append(event)

    def on_output(self, job: str, attempt: int, text: str) -> None:
        self.output.append((job, text))

    def on_note(self, text: str) -> None:
        self.output.append(("", text))


class Flag:
    def __init__(self) -> None:
        self.set_after_polls: int | None = None
        self.value = False

    def is_set(self) -> bool:
        return self.value


class MemoryArtifactStore:
    """ArtifactStore over a dict: ``files`` maps workspace paths to bytes a job "wrote"."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.exported: list[tuple[str, str]] = []

    def publish(self, root: str, rel_path: str, kind: str) -> StoredBlob:
        data = self.files.get(rel_path)
        if data is None:
            raise ArtifactError(f"declared output {rel_path} was not produced")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return StoredBlob(digest, len(data))

    def has(self, digest: str) -> bool:
        return digest in self.blobs

    def export(self, digest: str, kind: str, dest: str) -> None:
        if digest not in self.blobs:
            raise ArtifactError(f"no blob {digest}")
        self.exported.append((digest, dest))


class FakeAttestor:
    builder_id = "urn:test:builder"

    def __init__(self) -> None:
        self.statements: list[Mapping[str, Any]] = []

    def attest(self, statement: Mapping[str, Any]) -> str:
        self.statements.append(statement)
        return json.dumps({"payload": len(self.statements)})
