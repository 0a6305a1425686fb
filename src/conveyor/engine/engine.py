"""The engine: runs a pipeline's stages in order and its jobs as a DAG, and stops the line.

It is single-threaded and event-driven: start what is ready, wait for executor events, record
what happened, repeat. Every event is committed to the record before the engine acts on it
(starting dependants, retrying, moving to the next stage). All I/O goes through the ports in
``conveyor.domain.ports``.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor.domain import events as ev
from conveyor.domain.masking import Masker, StreamMasker
from conveyor.domain.ports import (
    AttemptLog,
    CancelToken,
    Clock,
    Executor,
    Exited,
    JobLaunch,
    LogStore,
    Observer,
    Output,
    RecordWriter,
    ReportReader,
    SourceSnapshot,
    Workspace,
)
from conveyor.domain.states import JOB_PASSED
from conveyor.engine.planning import cache_keys, job_decision
from conveyor.errors import ConveyorError
from conveyor.spec.models import JobSpec, PipelineSpec, StageSpec

KILL_GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL when a job is timed out or cancelled."""


@dataclass(frozen=True)
class RunOptions:
    """How to run: parallelism, selection, cache and fail-fast."""

    max_parallel: int = 2
    stages: tuple[str, ...] | None = None
    use_cache: bool = True
    fail_fast: bool = False


@dataclass(frozen=True)
class RunRequest:
    """One run of a pipeline on one revision."""

    run_id: int
    spec: PipelineSpec
    source: SourceSnapshot
    actor: str
    owner: Mapping[str, object]
    base_env: Mapping[str, str]
    secrets: Mapping[str, str]
    home: str
    options: RunOptions = RunOptions()


@dataclass(eq=False)
class _JobState:
    spec: JobSpec
    key: str
    status: str = "pending"
    attempt: int = 0
    exit_code: int | None = None
    first_start: float = 0.0
    attempt_start: float = 0.0
    deadline: float = 0.0
    kill_reason: str | None = None
    kill_at: float | None = None
    log: AttemptLog | None = None
    stream: StreamMasker | None = None
    launch_key: str = ""
    pid: int | None = None


@dataclass(eq=False)
class _Batch:
    """Events waiting to be committed together before the engine acts on them."""

    events: list[ev.Event] = field(default_factory=list)

    def add(self, event: ev.Event) -> None:
        self.events.append(event)


class Engine:
    """Drives one run through its stages; see the module docstring."""

    def __init__(
        self,
        *,
        record: RecordWriter,
        executor: Executor,
        logs: LogStore,
        reports: ReportReader,
        workspace: Workspace,
        clock: Clock,
        observer: Observer,
        cancel: CancelToken,
    ) -> None:
        self.record = record
        self.executor = executor
        self.logs = logs
        self.reports = reports
        self.workspace = workspace
        self.clock = clock
        self.observer = observer
        self.cancel = cancel
        self._batch = _Batch()
        self._masker = Masker(())
        self._cancelled = False

    # -- recording ---------------------------------------------------------------------------

    def _emit(self, event: ev.Event) -> None:
        self._batch.add(event)

    def _commit(self) -> None:
        """Commit pending events (one transaction), then tell the observer."""
        if not self._batch.events:
            return
        pending, self._batch = self._batch.events, _Batch()
        self.record.append(pending)
        for event in pending:
            self.observer.on_event(event)

    # -- the run -----------------------------------------------------------------------------

    def run(self, request: RunRequest) -> str:
        """Execute the run to a final status (``succeeded``, ``failed`` or ``cancelled``)."""
        spec, options = request.spec, request.options
        self._masker = Masker(request.secrets.values())
        keys = cache_keys(spec, request.source, request.secrets)
        self._emit(
            ev.RunStarted(
                run_id=request.run_id,
                pipeline=spec.name,
                revision=request.source.revision,
                pipeline_file=spec.source,
                pipeline_digest=spec.digest,
                dirty=request.source.dirty,
                actor=request.actor,
                stages=[{"name": s.name, "jobs": [j.name for j in s.jobs]} for s in spec.stages],
                owner=dict(request.owner),
                options={
                    "jobs": options.max_parallel,
                    "stages": list(options.stages) if options.stages else None,
                    "cache": options.use_cache,
                    "fail_fast": options.fail_fast,
                },
            )
        )
        self._commit()
        status = "succeeded"
        reason = ""
        try:
            for stage in spec.stages:
                if status != "succeeded":
                    self._skip_stage(request.run_id, stage, reason or "an earlier stage failed")
                    continue
                if options.stages is not None and stage.name not in options.stages:
                    self._skip_stage(request.run_id, stage, "stage not selected (--stage)")
                    continue
                stage_status = self._run_stage(request, stage, keys)
                if stage_status == "cancelled":
                    status, reason = "cancelled", "the run was cancelled"
                elif stage_status == "failed":
                    status, reason = "failed", f"stage '{stage.name}' failed"
            self._emit(ev.RunFinished(run_id=request.run_id, status=status, reason=reason))
            self._commit()
        finally:
            self.executor.close()
        return status

    def _skip_stage(self, run_id: int, stage: StageSpec, reason: str) -> None:
        for job in stage.jobs:
            self._emit(ev.JobSkipped(run_id=run_id, stage=stage.name, job=job.name, reason=reason))
        self._emit(ev.StageFinished(run_id=run_id, stage=stage.name, status="skipped"))
        self._commit()

    def _run_stage(self, request: RunRequest, stage: StageSpec, keys: Mapping[str, str]) -> str:
        """Run one stage's DAG to the end; returns the stage's status.

        Each loop: start what is ready (events only), commit, spawn what was started, wait for
        the executor, record what ended. So every event is committed before the engine acts on
        it, with one transaction per loop for all the jobs that moved.
        """
        self._emit(ev.StageStarted(run_id=request.run_id, stage=stage.name))
        run = _StageRun(request, stage, keys)
        while True:
            if self.cancel.is_set() and not self._cancelled:
                self._cancelled = True
                self._stop_stage(run, "cancelled", "the run was cancelled")
            self._start_ready(run)
            self._commit()
            self._spawn(run)
            if not run.running:
                if run.ready:
                    continue
                break
            self._wait(run)
            self._check_deadlines(run)
        if self._cancelled:
            status = "cancelled"
        elif any(
            s.status not in JOB_PASSED and not s.spec.allow_failure for s in run.jobs.values()
        ):
            status = "failed"
        else:
            status = "succeeded"
        self._emit(ev.StageFinished(run_id=request.run_id, stage=stage.name, status=status))
        self._commit()
        return status

    # -- scheduling --------------------------------------------------------------------------

    def _start_ready(self, run: _StageRun) -> None:
        """Take ready jobs (file order) up to the parallelism limit: cache hit or new attempt."""
        request = run.request
        limit = max(1, request.options.max_parallel)
        while run.ready and len(run.running) < limit:
            state = run.jobs[heapq.heappop(run.ready)[1]]
            if state.status != "pending":
                continue
            action, _, hit = job_decision(
                state.spec, state.key, request.options.use_cache, self.record.find_cache
            )
            if action == "cached" and hit is not None:
                state.status = "cached"
                self._emit(
                    ev.JobCached(
                        run_id=request.run_id,
                        stage=run.stage.name,
                        job=state.spec.name,
                        cache_key=state.key,
                        source_run=hit.run_id,
                        source_job=hit.job,
                        source_attempt=hit.attempt,
                    )
                )
                run.release(state.spec.name)
                continue
            self._new_attempt(run, state)

    def _new_attempt(self, run: _StageRun, state: _JobState) -> None:
        """Record the start of an attempt; the process is spawned after the commit."""
        request, job = run.request, state.spec
        state.attempt += 1
        state.status = "running"
        state.kill_reason = None
        state.kill_at = None
        state.log = self.logs.open_attempt(request.run_id, job.name, state.attempt)
        state.stream = self._masker.stream()
        state.launch_key = f"{job.name}#{state.attempt}"
        run.running[state.launch_key] = state
        run.to_spawn.append(state)
        self._emit(
            ev.JobAttemptStarted(
                run_id=request.run_id,
                stage=run.stage.name,
                job=job.name,
                attempt=state.attempt,
                cache_key=state.key,
                log=state.log.path,
            )
        )

    def _spawn(self, run: _StageRun) -> None:
        """Start the processes of the attempts recorded as started."""
        request = run.request
        pending, run.to_spawn = run.to_spawn, []
        for state in pending:
            job = state.spec
            if state.kill_reason is not None:
                self._attempt_ended(run, state, None)
                continue
            try:
                workspace = self.workspace.path()
                env = dict(request.base_env)
                env.update(request.spec.env)
                env.update(job.env)
                env.update(request.secrets)
                env.update(
                    {
                        "CI": "true",
                        "CONVEYOR": "true",
                        "CONVEYOR_RUN_ID": str(request.run_id),
                        "CONVEYOR_RUN_TOKEN": str(request.owner.get("token", "")),
                        "CONVEYOR_REVISION": request.source.revision,
                        "CONVEYOR_PIPELINE": request.spec.name,
                        "CONVEYOR_STAGE": run.stage.name,
                        "CONVEYOR_JOB": job.name,
                        "CONVEYOR_ATTEMPT": str(state.attempt),
                        "CONVEYOR_WORKSPACE": workspace,
                    }
                )
                now = self.clock.monotonic()
                if state.attempt == 1:
                    state.first_start = now
                state.attempt_start = now
                state.deadline = now + job.timeout_s
                state.pid = self.executor.start(
                    JobLaunch(key=state.launch_key, script=job.run, env=env, cwd=workspace)
                )
            except ConveyorError as exc:
                assert state.log is not None
                state.log.write(f"conveyor: {exc.render()}\n".encode())
                state.pid = None
                self._attempt_ended(run, state, None)

    # -- waiting -----------------------------------------------------------------------------

    def _wait(self, run: _StageRun) -> None:
        """Wait for executor events and record what they mean."""
        now = self.clock.monotonic()
        wake = min(
            (s.kill_at if s.kill_at is not None else s.deadline) for s in run.running.values()
        )
        for event in self.executor.poll(max(0.0, wake - now)):
            state = run.running.get(event.key)
            if state is None:
                continue
            if isinstance(event, Output):
                self._output(state, event.data)
            elif isinstance(event, Exited):
                self._attempt_ended(run, state, event.exit_code)

    def _output(self, state: _JobState, data: bytes) -> None:
        assert state.stream is not None and state.log is not None
        masked = state.stream.feed(data)
        if masked:
            state.log.write(masked)
            self.observer.on_output(
                state.spec.name, state.attempt, masked.decode("utf-8", "replace")
            )

    def _check_deadlines(self, run: _StageRun) -> None:
        now = self.clock.monotonic()
        for state in run.running.values():
            if state.kill_at is not None and now >= state.kill_at:
                self.executor.kill(state.launch_key, force=True)
                state.kill_at = now + KILL_GRACE_S
            elif state.kill_reason is None and now >= state.deadline:
                self._kill(state, "timed_out")

    def _kill(self, state: _JobState, reason: str) -> None:
        if state.kill_reason is not None:
            return
        state.kill_reason = reason
        state.kill_at = self.clock.monotonic() + KILL_GRACE_S
        self.executor.kill(state.launch_key, force=False)

    def _stop_stage(self, run: _StageRun, kill_reason: str, skip_reason: str) -> None:
        """Cancel every running attempt and skip every job that has not started."""
        for state in run.running.values():
            if state.pid is not None:
                self._kill(state, kill_reason)
            else:  # recorded as started but not spawned yet: it never will be
                state.kill_reason = kill_reason
        for state in run.jobs.values():
            if state.status == "pending":
                self._skip(run, state, skip_reason)

    def _skip(self, run: _StageRun, state: _JobState, reason: str) -> None:
        state.status = "skipped"
        self._emit(
            ev.JobSkipped(
                run_id=run.request.run_id, stage=run.stage.name, job=state.spec.name, reason=reason
            )
        )

    def _attempt_ended(self, run: _StageRun, state: _JobState, exit_code: int | None) -> None:
        """Record an ended attempt, then retry it or finish the job."""
        assert state.stream is not None and state.log is not None
        request, job = run.request, state.spec
        rest = state.stream.flush()
        if rest:
            state.log.write(rest)
            self.observer.on_output(job.name, state.attempt, rest.decode("utf-8", "replace"))
        summary = state.log.close()
        del run.running[state.launch_key]
        if state.kill_reason is not None:
            status = state.kill_reason
        else:
            status = "succeeded" if exit_code == 0 else "failed"
        state.exit_code = exit_code
        ending: dict[str, Any] = {
            "attempt": state.attempt,
            "status": status,
            "exit_code": exit_code,
            "pid": state.pid,
            "duration_s": round(self.clock.monotonic() - state.attempt_start, 6),
            "log_bytes": summary.size,
            "log_sha256": summary.sha256,
            "log_truncated": summary.truncated,
        }
        retry = (
            status in ("failed", "timed_out")
            and state.attempt <= job.retries
            and not self._cancelled
            and not self.cancel.is_set()
        )
        if retry:
            self._emit(
                ev.JobAttemptFinished(
                    run_id=request.run_id, stage=run.stage.name, job=job.name, **ending
                )
            )
            if job.junit:
                self._report_tests(run, state)
            self._new_attempt(run, state)
            return
        state.status = status
        self._emit(
            ev.JobFinished(
                run_id=request.run_id,
                stage=run.stage.name,
                job=job.name,
                status=status,
                exit_code=exit_code,
                attempts=state.attempt,
                duration_s=round(self.clock.monotonic() - state.first_start, 6),
                cache_key=state.key,
                attempt=ending,
            )
        )
        if job.junit:
            self._report_tests(run, state)
        if status in JOB_PASSED or job.allow_failure:
            run.release(job.name)  # an allowed failure does not block its dependants
            return
        for name, need in run.blocked_by(job.name):
            self._skip(
                run, run.jobs[name], f"it needs '{need}', which ended {run.jobs[need].status}"
            )
        if request.options.fail_fast and not job.allow_failure and not self._cancelled:
            self._stop_stage(run, "cancelled", "a job of the stage failed (--fail-fast)")

    def _report_tests(self, run: _StageRun, state: _JobState) -> None:
        result = self.reports.read_junit(self.workspace.path(), state.spec.junit)
        mask = self._masker.mask_text
        tests = [
            {
                "name": mask(t.name),
                "classname": mask(t.classname),
                "file": mask(t.file),
                "outcome": t.outcome,
                "duration_s": t.duration_s,
                "message": mask(t.message),
            }
            for t in result.tests
        ]
        self._emit(
            ev.TestsReported(
                run_id=run.request.run_id,
                stage=run.stage.name,
                job=state.spec.name,
                attempt=state.attempt,
                passed=sum(t.outcome == "passed" for t in result.tests),
                failed=sum(t.outcome in ("failed", "error") for t in result.tests),
                skipped=sum(t.outcome == "skipped" for t in result.tests),
                tests=tests,
                problems=[mask(p) for p in result.problems],
            )
        )


class _StageRun:
    """Scheduling state of one stage: unmet needs, the ready queue, the running attempts."""

    def __init__(self, request: RunRequest, stage: StageSpec, keys: Mapping[str, str]) -> None:
        self.request = request
        self.stage = stage
        self.jobs = {job.name: _JobState(spec=job, key=keys[job.name]) for job in stage.jobs}
        self.index = {job.name: i for i, job in enumerate(stage.jobs)}
        self.unmet = {job.name: len(set(job.needs)) for job in stage.jobs}
        self.dependants: dict[str, list[str]] = {job.name: [] for job in stage.jobs}
        for job in stage.jobs:
            for need in set(job.needs):
                self.dependants[need].append(job.name)
        self.ready: list[tuple[int, str]] = [
            (self.index[name], name) for name, count in self.unmet.items() if count == 0
        ]
        heapq.heapify(self.ready)
        self.running: dict[str, _JobState] = {}
        self.to_spawn: list[_JobState] = []

    def release(self, name: str) -> None:
        """``name`` passed: its dependants whose needs are all met become ready."""
        for dependant in self.dependants[name]:
            self.unmet[dependant] -= 1
            if self.unmet[dependant] == 0:
                heapq.heappush(self.ready, (self.index[dependant], dependant))

    def blocked_by(self, name: str) -> list[tuple[str, str]]:
        """Pending jobs that can no longer run because ``name`` did not pass, with the need
        that blocks each (breadth first)."""
        out: list[tuple[str, str]] = []
        seen = {name}
        queue = [name]
        while queue:
            current = queue.pop(0)
            for dependant in self.dependants[current]:
                if dependant not in seen and self.jobs[dependant].status == "pending":
                    seen.add(dependant)
                    out.append((dependant, current))
                    queue.append(dependant)
        return out
