"""The engine: runs a pipeline's stages in order and its jobs as a DAG, and stops the line.

It is single-threaded and event-driven: start what is ready, wait for executor events, record
what happened, repeat. Every event is committed to the record before the engine acts on it
(starting dependants, retrying, moving to the next stage). All I/O goes through the ports in
``conveyor.domain.ports``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
from conveyor.domain.states import JOB_FINAL, JOB_PASSED
from conveyor.engine.planning import cache_keys, job_decision
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


@dataclass
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


@dataclass
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
        run_id = request.run_id
        options = request.options
        self._emit(ev.StageStarted(run_id=run_id, stage=stage.name))
        self._commit()
        jobs = {job.name: _JobState(spec=job, key=keys[job.name]) for job in stage.jobs}
        running: dict[str, _JobState] = {}
        failed = False
        while True:
            if self.cancel.is_set() and not self._cancelled:
                self._cancel_all(running)
            progressed = self._settle_pending(request, stage, jobs, failed)
            if not self._cancelled and not (failed and options.fail_fast):
                progressed |= self._start_ready(request, stage, jobs, running)
            self._commit()
            if not running:
                if progressed:
                    continue
                break
            failed |= self._wait(request, stage, running, jobs)
            self._commit()  # what just ended is on the record before anything acts on it
            if failed and options.fail_fast and not self._cancelled:
                for state in running.values():
                    self._kill(state, "cancelled")
        if self._cancelled:
            stage_status = "cancelled"
        elif any(s.status not in JOB_PASSED and not s.spec.allow_failure for s in jobs.values()):
            stage_status = "failed"
        else:
            stage_status = "succeeded"
        self._emit(ev.StageFinished(run_id=run_id, stage=stage.name, status=stage_status))
        self._commit()
        return stage_status

    # -- scheduling --------------------------------------------------------------------------

    def _settle_pending(
        self, request: RunRequest, stage: StageSpec, jobs: dict[str, _JobState], failed: bool
    ) -> bool:
        """Skip pending jobs that can no longer run; returns whether any was skipped."""
        changed = False
        for state in jobs.values():
            if state.status != "pending":
                continue
            reason = None
            if self._cancelled:
                reason = "the run was cancelled"
            elif failed and request.options.fail_fast:
                reason = "a job of the stage failed (--fail-fast)"
            else:
                for need in state.spec.needs:
                    other = jobs[need]
                    if other.status in JOB_FINAL and other.status not in JOB_PASSED:
                        reason = f"it needs '{need}', which ended {other.status}"
                        break
            if reason:
                state.status = "skipped"
                self._emit(
                    ev.JobSkipped(
                        run_id=request.run_id, stage=stage.name, job=state.spec.name, reason=reason
                    )
                )
                changed = True
        return changed

    def _start_ready(
        self,
        request: RunRequest,
        stage: StageSpec,
        jobs: dict[str, _JobState],
        running: dict[str, _JobState],
    ) -> bool:
        started = False
        limit = max(1, request.options.max_parallel)
        for state in jobs.values():
            if len(running) >= limit:
                break
            if state.status != "pending":
                continue
            if any(jobs[need].status not in JOB_PASSED for need in state.spec.needs):
                continue
            action, _, hit = job_decision(
                state.spec, state.key, request.options.use_cache, self.record.find_cache
            )
            if action == "cached" and hit is not None:
                state.status = "cached"
                self._emit(
                    ev.JobCached(
                        run_id=request.run_id,
                        stage=stage.name,
                        job=state.spec.name,
                        cache_key=state.key,
                        source_run=hit.run_id,
                        source_attempt=hit.attempt,
                    )
                )
                started = True
                continue
            state.first_start = self.clock.monotonic()
            self._start_attempt(request, stage, state)
            running[state.spec.name] = state
            started = True
        return started

    def _start_attempt(self, request: RunRequest, stage: StageSpec, state: _JobState) -> None:
        job = state.spec
        state.attempt += 1
        state.status = "running"
        state.kill_reason = None
        state.kill_at = None
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
                "CONVEYOR_STAGE": stage.name,
                "CONVEYOR_JOB": job.name,
                "CONVEYOR_ATTEMPT": str(state.attempt),
                "CONVEYOR_WORKSPACE": workspace,
            }
        )
        state.log = self.logs.open_attempt(request.run_id, job.name, state.attempt)
        state.stream = self._masker.stream()
        state.launch_key = f"{job.name}#{state.attempt}"
        pid = self.executor.start(
            JobLaunch(key=state.launch_key, script=job.run, env=env, cwd=workspace)
        )
        state.attempt_start = self.clock.monotonic()
        state.deadline = state.attempt_start + job.timeout_s
        self._emit(
            ev.JobAttemptStarted(
                run_id=request.run_id,
                stage=stage.name,
                job=job.name,
                attempt=state.attempt,
                pid=pid,
                cache_key=state.key,
                log=state.log.path,
            )
        )

    # -- waiting -----------------------------------------------------------------------------

    def _wait(
        self,
        request: RunRequest,
        stage: StageSpec,
        running: dict[str, _JobState],
        jobs: dict[str, _JobState],
    ) -> bool:
        """Wait for executor events and handle them; returns whether a job failed for good."""
        now = self.clock.monotonic()
        wake = min((s.kill_at if s.kill_at is not None else s.deadline) for s in running.values())
        events = self.executor.poll(max(0.0, wake - now))
        by_key = {s.launch_key: s for s in running.values()}
        failed = False
        for event in events:
            state = by_key.get(event.key)
            if state is None:
                continue
            if isinstance(event, Output):
                self._output(state, event.data)
            elif isinstance(event, Exited) and self._finish_attempt(
                request, stage, state, event.exit_code
            ):
                del running[state.spec.name]
                if state.status not in JOB_PASSED and not state.spec.allow_failure:
                    failed = True
        self._check_deadlines(running)
        return failed

    def _output(self, state: _JobState, data: bytes) -> None:
        assert state.stream is not None and state.log is not None
        masked = state.stream.feed(data)
        if masked:
            state.log.write(masked)
            self.observer.on_output(
                state.spec.name, state.attempt, masked.decode("utf-8", "replace")
            )

    def _check_deadlines(self, running: Mapping[str, _JobState]) -> None:
        now = self.clock.monotonic()
        for state in running.values():
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

    def _cancel_all(self, running: Mapping[str, _JobState]) -> None:
        self._cancelled = True
        for state in running.values():
            self._kill(state, "cancelled")

    def _finish_attempt(
        self, request: RunRequest, stage: StageSpec, state: _JobState, exit_code: int
    ) -> bool:
        """Record an ended attempt; retry or finish the job. Returns whether the job is final."""
        assert state.stream is not None and state.log is not None
        rest = state.stream.flush()
        if rest:
            state.log.write(rest)
            self.observer.on_output(state.spec.name, state.attempt, rest.decode("utf-8", "replace"))
        summary = state.log.close()
        duration = self.clock.monotonic() - state.attempt_start
        if state.kill_reason is not None:
            status = state.kill_reason
        else:
            status = "succeeded" if exit_code == 0 else "failed"
        state.exit_code = exit_code
        job = state.spec
        self._emit(
            ev.JobAttemptFinished(
                run_id=request.run_id,
                stage=stage.name,
                job=job.name,
                attempt=state.attempt,
                status=status,
                exit_code=exit_code,
                duration_s=round(duration, 6),
                log_bytes=summary.size,
                log_sha256=summary.sha256,
                log_truncated=summary.truncated,
            )
        )
        if job.junit:
            self._report_tests(request, stage, state)
        retry = (
            status in ("failed", "timed_out")
            and state.attempt <= job.retries
            and not self._cancelled
            and not self.cancel.is_set()
        )
        if retry:
            self._commit()
            self._start_attempt(request, stage, state)
            return False
        state.status = status
        self._emit(
            ev.JobFinished(
                run_id=request.run_id,
                stage=stage.name,
                job=job.name,
                status=status,
                exit_code=exit_code,
                attempts=state.attempt,
                duration_s=round(self.clock.monotonic() - state.first_start, 6),
                cache_key=state.key,
            )
        )
        return True

    def _report_tests(self, request: RunRequest, stage: StageSpec, state: _JobState) -> None:
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
                run_id=request.run_id,
                stage=stage.name,
                job=state.spec.name,
                attempt=state.attempt,
                passed=sum(t.outcome == "passed" for t in result.tests),
                failed=sum(t.outcome in ("failed", "error") for t in result.tests),
                skipped=sum(t.outcome == "skipped" for t in result.tests),
                tests=tests,
                problems=[mask(p) for p in result.problems],
            )
        )


def selected_stages(spec: PipelineSpec, names: Sequence[str]) -> tuple[str, ...]:
    """Validate ``--stage`` names against the pipeline; raises ``KeyError`` for an unknown one."""
    known = {stage.name for stage in spec.stages}
    for name in names:
        if name not in known:
            raise KeyError(name)
    return tuple(names)
