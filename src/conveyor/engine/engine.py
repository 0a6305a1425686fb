"""The engine: runs a pipeline's stages in order and its jobs as a DAG, and stops the line.

It is single-threaded and event-driven: start what is ready, wait for executor events, record
what happened, repeat. Every event is committed to the record before the engine acts on it
(starting dependants, retrying, moving to the next stage). All I/O goes through the ports in
``conveyor.domain.ports``.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from conveyor import __version__
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
    ReportResult,
    SourceSnapshot,
    Workspace,
)
from conveyor.domain.states import JOB_PASSED
from conveyor.engine.planning import (
    cache_keys,
    job_decision,
    uncached_reason,
    uncached_sources,
)
from conveyor.errors import ArtifactError, ConveyorError
from conveyor.spec.models import JobSpec, PipelineSpec, StageSpec

if TYPE_CHECKING:  # delivery interfaces: imported only by pipelines that use them
    from conveyor.domain.delivery import (
        ArtifactRecord,
        ArtifactStore,
        Attestor,
        Deployments,
        StageGates,
    )

ARTIFACTS_DIR = ".conveyor-artifacts"
"""Folder of the workspace where each attempt receives its input artifacts."""

KILL_GRACE_S = 3.0
"""Seconds between SIGTERM and SIGKILL when a job is timed out or cancelled."""

_UTF8_DECODER = codecs.getincrementaldecoder("utf-8")


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
    repository: str = ""
    """URI of the repository the revision comes from (for provenance)."""
    branch: str = ""
    """The branch the revision was taken from, if any (environments' branch policy)."""


@dataclass(eq=False)
class _JobState:
    """What the engine knows about one job of the stage it is running."""

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
    decoder: codecs.IncrementalDecoder | None = None
    """Job output to text for the observer (a character may be split across writes)."""
    launch_key: str = ""
    pid: int | None = None
    started_at: str = ""
    inputs: list[ArtifactRecord] = field(default_factory=list)


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
        artifacts: ArtifactStore | None = None,
        attestor: Attestor | None = None,
        deployer: Deployments | None = None,
        stage_gates: StageGates | None = None,
    ) -> None:
        self.record = record
        self.deployer = deployer
        self.stage_gates = stage_gates
        self.artifacts = artifacts
        self.attestor = attestor
        self.executor = executor
        self.logs = logs
        self.reports = reports
        self.workspace = workspace
        self.clock = clock
        self.observer = observer
        self.cancel = cancel
        self._batch: list[ev.Event] = []
        """Events waiting to be committed together before the engine acts on them."""
        self._masker = Masker(())
        self._uncached: dict[str, str] = {}
        """Why a job cannot be taken from the cache, for those that cannot: they depend on one
        that opts out of caching (``uncached_sources``), or on artifacts this run lacks."""
        self._cancelled = False
        self._published: dict[str, tuple[str, ArtifactRecord]] = {}
        """This run's artifacts: name -> (stage, record)."""

    # -- recording ---------------------------------------------------------------------------

    def _emit(self, event: ev.Event) -> None:
        if self._masker:  # secrets are masked in every record, whatever field they reach
            event = self._masker.mask_event(event)
        self._batch.append(event)

    def _note(self, state: _JobState, text: str) -> None:
        """A line from Conveyor itself in the attempt's log and live output (masked)."""
        assert state.log is not None
        data = self._masker.mask_bytes(f"conveyor: {text}\n".encode())
        state.log.write(data)
        self.observer.on_output(state.spec.name, state.attempt, data.decode("utf-8", "replace"))

    def _commit(self) -> None:
        """Commit pending events (one transaction), then tell the observer."""
        if not self._batch:
            return
        pending, self._batch = self._batch, []
        self.record.append(pending)
        for event in pending:
            self.observer.on_event(event)

    # -- the run -----------------------------------------------------------------------------

    def run(self, request: RunRequest) -> str:
        """Execute the run to a final status (``succeeded``, ``failed`` or ``cancelled``)."""
        spec, options = request.spec, request.options
        if spec.artifacts and (self.artifacts is None or self.attestor is None):
            raise ConveyorError("this engine has no artifact store: the pipeline needs one")
        self._masker = Masker(request.secrets.values())
        keys = cache_keys(spec, request.source, request.secrets)
        self._uncached = {
            name: uncached_reason(source) for name, source in uncached_sources(spec).items()
        }
        keys = dict(keys)  # a stage run alone may make later jobs' keys unusable
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
                branch=request.branch,
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
                    missing = self._reuse_outputs(request, stage, keys)
                    if missing:
                        self._without_artifacts(spec, stage, missing, keys)
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

    def _reuse_outputs(
        self, request: RunRequest, stage: StageSpec, keys: Mapping[str, str]
    ) -> list[str]:
        """The artifacts of a stage that is not selected, for the later stages: from the cache
        (an earlier run built them from the same inputs), else later jobs go without them;
        returns the names of those missing."""
        missing: list[str] = []
        for job in stage.jobs:
            if not job.outputs:
                continue
            action, _, hit = job_decision(
                job,
                keys[job.name],
                request.options.use_cache,
                self.record.find_cache,
                self._uncached.get(job.name),
            )
            reused = self._reusable_artifacts(job, hit) if hit is not None else None
            if action == "cached" and hit is not None and reused:
                for item in reused:
                    self._announce(request.run_id, stage.name, job, item, source_run=hit.run_id)
                continue
            missing.extend(job.outputs)
            names = ", ".join(f"'{name}'" for name in job.outputs)
            self.observer.on_note(
                f"artifacts {names} are not available to later stages: stage '{stage.name}'"
                " is not selected and no earlier run built them from the same inputs"
            )
        self._commit()
        return missing

    def _without_artifacts(
        self, spec: PipelineSpec, stage: StageSpec, missing: list[str], keys: dict[str, str]
    ) -> None:
        """The jobs after ``stage`` run without ``missing``: their keys (which cover those
        artifacts) must neither find a cache entry nor make one."""
        names = ", ".join(f"'{name}'" for name in missing)
        later = spec.stages[spec.stages.index(stage) + 1 :]
        for other in later:
            for job in other.jobs:
                keys[job.name] = ""
                self._uncached[job.name] = f"artifacts {names} are not available to this run"

    def _run_stage(self, request: RunRequest, stage: StageSpec, keys: Mapping[str, str]) -> str:
        """Run one stage's DAG to the end; returns the stage's status.

        Each loop: start what is ready (events only), commit, spawn what was started, wait for
        the executor, record what ended. So every event is committed before the engine acts on
        it, with one transaction per loop for all the jobs that moved.
        """
        self._emit(ev.StageStarted(run_id=request.run_id, stage=stage.name))
        if stage.gates:
            blocked = self._check_stage_gates(request, stage)
            if blocked:
                for job in stage.jobs:
                    self._emit(
                        ev.JobSkipped(
                            run_id=request.run_id, stage=stage.name, job=job.name, reason=blocked
                        )
                    )
                self._emit(
                    ev.StageFinished(
                        run_id=request.run_id, stage=stage.name, status="failed", reason=blocked
                    )
                )
                self._commit()
                return "failed"
        if stage.deploy is not None:
            return self._deploy_stage(request, stage)
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
        if self.cancel.is_set() and not self._cancelled:  # after the last attempt had ended
            self._cancelled = True
            self._stop_stage(run, "cancelled", "the run was cancelled")
        self.executor.sweep()  # nothing a job of this stage started outlives the stage
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

    def _check_stage_gates(self, request: RunRequest, stage: StageSpec) -> str:
        """Evaluate the stage's gates (recorded); the reason the stage may not start, or ``""``."""
        self._commit()  # the gates read what the run recorded so far
        if self.stage_gates is None:
            return "this engine cannot evaluate gates"
        results = self.stage_gates.check(stage, request.run_id)
        for result in results:
            self._emit(
                ev.GateEvaluated(
                    run_id=request.run_id,
                    environment="",
                    stage=stage.name,
                    digest="",
                    gate=result.gate,
                    gate_kind=result.kind,
                    verdict=result.status,
                    summary=result.summary,
                    evidence=dict(result.evidence),
                )
            )
        failed = [r for r in results if r.status != "passed"]
        if not failed:
            return ""
        return f"gate '{failed[0].gate}' failed: {failed[0].summary}"

    def _deploy_stage(self, request: RunRequest, stage: StageSpec) -> str:
        """A deploy stage: the run's artifact goes to the environment (or the stage fails)."""
        assert stage.deploy is not None
        self._commit()
        name = stage.deploy.artifact
        published = self._published.get(name)
        status, reason = "failed", ""
        if self.deployer is None:
            reason = "this engine cannot deploy"
        elif published is None:
            reason = f"the run has no artifact '{name}' (its producing job did not publish it)"
        elif self._cancelled or self.cancel.is_set():
            status, reason = "cancelled", "the run was cancelled"
        else:
            try:
                outcome = self.deployer.deploy(
                    request.spec.environment(stage.deploy.environment),
                    published[1],
                    revision=request.source.revision,
                    actor=request.actor,
                    trigger="stage",
                )
            except ConveyorError as exc:
                reason = exc.message
                if self.cancel.is_set():  # broken off by the run's cancellation
                    status = "cancelled"
            else:
                status = "succeeded" if outcome.status == "succeeded" else "failed"
                if outcome.cancelled or (outcome.status == "interrupted" and self.cancel.is_set()):
                    status = "cancelled"  # the cancel cut a rollback's check short
                reason = (
                    f"deployment {outcome.deployment_id} to {stage.deploy.environment}:"
                    f" {outcome.status}" + (f" ({outcome.reason})" if outcome.reason else "")
                )
        self._emit(
            ev.StageFinished(run_id=request.run_id, stage=stage.name, status=status, reason=reason)
        )
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
                state.spec,
                state.key,
                request.options.use_cache,
                self.record.find_cache,
                self._uncached.get(state.spec.name),
            )
            reused = self._reusable_artifacts(state.spec, hit) if hit is not None else None
            if action == "cached" and hit is not None and reused is not None:
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
                for item in reused:
                    self._announce(
                        request.run_id, run.stage.name, state.spec, item, source_run=hit.run_id
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
        state.pid = None  # not spawned yet: a cancel marks it instead of signalling attempt 1
        state.deadline = self.clock.monotonic() + job.timeout_s  # attempt 1's has passed
        state.log = self.logs.open_attempt(request.run_id, job.name, state.attempt)
        state.stream = self._masker.stream()
        state.decoder = _UTF8_DECODER("replace")
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
            self._mark_start(state)  # also for an attempt that ends before its process starts
            if state.kill_reason is None and self.cancel.is_set():
                state.kill_reason = "cancelled"
            if state.kill_reason is not None:
                self._attempt_ended(run, state, None)
                continue
            if state.log is not None and state.log.problem:
                # Its log file exists (another record's): never run output into it. It fails,
                # and _attempt_ended says why.
                self._attempt_ended(run, state, None)
                continue
            try:
                workspace = self.workspace.path()
                if self.cancel.is_set():  # while the checkout ran (Ctrl-C, SIGTERM)
                    state.kill_reason = "cancelled"
                    self._attempt_ended(run, state, None)
                    continue
                if job.outputs:  # the provenance says when the build started
                    state.started_at = self.clock.now()
                inputs = self._receive_artifacts(run, state, workspace)
                if run.env_head is None:  # the same for every job of the stage
                    run.env_head = {**request.base_env, **request.spec.env}
                    run.env_tail = {
                        **request.secrets,
                        "CI": "true",
                        "CONVEYOR": "true",
                        "CONVEYOR_RUN_ID": str(request.run_id),
                        "CONVEYOR_RUN_TOKEN": str(request.owner.get("token", "")),
                        "CONVEYOR_REVISION": request.source.revision,
                        "CONVEYOR_PIPELINE": request.spec.name,
                        "CONVEYOR_STAGE": run.stage.name,
                        "CONVEYOR_WORKSPACE": workspace,
                    }
                # Later wins: the OS, the pipeline's env, the job's env, secrets, Conveyor's
                # variables, received artifacts.
                env = dict(run.env_head)
                env.update(job.env)
                env.update(run.env_tail)
                env["CONVEYOR_JOB"] = job.name
                env["CONVEYOR_ATTEMPT"] = str(state.attempt)
                env.update(inputs)
                self._mark_start(state)  # durations measure the process, not its preparation
                state.deadline = state.attempt_start + job.timeout_s
                state.pid = self.executor.start(
                    JobLaunch(key=state.launch_key, script=job.run, env=env, cwd=workspace)
                )
            except ConveyorError as exc:
                if self.cancel.is_set():  # the checkout stopped because the run was cancelled
                    state.kill_reason = "cancelled"
                else:
                    self._note(state, exc.render())
                state.pid = None
                self._attempt_ended(run, state, None)

    def _mark_start(self, state: _JobState) -> None:
        now = self.clock.monotonic()
        if state.attempt == 1:
            state.first_start = now
        state.attempt_start = now

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
        assert state.stream is not None and state.log is not None and state.decoder is not None
        masked = state.stream.feed(data)
        if masked:
            state.log.write(masked)
            text = state.decoder.decode(masked)
            if text:
                self.observer.on_output(state.spec.name, state.attempt, text)

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
        assert state.stream is not None and state.log is not None and state.decoder is not None
        request, job = run.request, state.spec
        rest = state.stream.flush()
        if rest:
            state.log.write(rest)
        text = state.decoder.decode(rest, final=True)
        if text:
            self.observer.on_output(job.name, state.attempt, text)
        if state.kill_reason is not None:
            status = state.kill_reason
        else:
            status = "succeeded" if exit_code == 0 else "failed"
        reports: list[ev.ReportRecorded] = []
        if status == "succeeded" and (job.coverage or job.metrics):
            reports = self._read_reports(run, state)
        published: list[ev.ArtifactPublished] = []
        if status == "succeeded" and job.outputs:
            try:
                published = self._publish_outputs(run, state)
            except ConveyorError as exc:
                self._note(state, exc.render())
                status = "failed"
        junit = self._read_tests(state) if job.junit else None
        summary = state.log.close()
        if summary.problem:
            note = self._masker.mask_text(f"conveyor: {summary.problem}\n")
            self.observer.on_output(job.name, state.attempt, note)
            if status == "succeeded":
                status = "failed"
        del run.running[state.launch_key]
        if state.kill_reason is not None and state.pid is not None:
            self.executor.sweep()  # what it started in groups of their own ends with it
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
            if junit is not None:
                self._report_tests(run, state, junit)
            self._new_attempt(run, state)
            return
        state.status = status
        for report in reports:
            self._emit(report)
        for event in published:
            self._emit(event)
            self._published[event.name] = (run.stage.name, _record_of(event))
        if junit is not None:  # the tests of the last attempt come before its end, as retries'
            self._report_tests(run, state, junit)
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
        if status in JOB_PASSED or job.allow_failure:
            run.release(job.name)  # an allowed failure does not block its dependants
            return
        for name, need in run.blocked_by(job.name):
            self._skip(
                run, run.jobs[name], f"it needs '{need}', which ended {run.jobs[need].status}"
            )
        if request.options.fail_fast and not job.allow_failure and not self._cancelled:
            self._stop_stage(run, "cancelled", "a job of the stage failed (--fail-fast)")

    def _read_reports(self, run: _StageRun, state: _JobState) -> list[ev.ReportRecorded]:
        """The job's coverage and metrics reports; a missing one is noted in its log."""
        assert state.log is not None
        job = state.spec
        events = []
        for kind, path in (("coverage", job.coverage), ("metrics", job.metrics)):
            if path is None:
                continue
            try:
                data = self.reports.read_report(self.workspace.path(), kind, path)
            except ConveyorError as exc:
                self._note(state, exc.render())
                continue
            events.append(
                ev.ReportRecorded(
                    run_id=run.request.run_id,
                    stage=run.stage.name,
                    job=job.name,
                    report=kind,
                    path=path,
                    data=data,
                )
            )
        return events

    # -- artifacts ---------------------------------------------------------------------------

    def _reusable_artifacts(self, job: JobSpec, hit: Any) -> list[ArtifactRecord] | None:
        """The artifacts a cache hit published, if they are all still in the store."""
        if not job.outputs:
            return []
        assert self.artifacts is not None
        items = self.record.job_artifacts(hit.run_id, hit.job)
        if sorted(i.name for i in items) != sorted(job.outputs):
            return None
        if not all(self.artifacts.has(i.digest) for i in items):
            return None
        return items

    def _announce(
        self, run_id: int, stage: str, job: JobSpec, item: ArtifactRecord, source_run: int | None
    ) -> None:
        """Record that this run has ``item`` (reused from ``source_run``) and can pass it on."""
        self._emit(
            ev.ArtifactPublished(
                run_id=run_id,
                stage=stage,
                job=job.name,
                name=item.name,
                artifact_kind=item.kind,
                digest=item.digest,
                size=item.size,
                path=item.path,
                provenance=item.provenance,
                source_run=source_run,
            )
        )
        self._published[item.name] = (
            stage,
            _record_of(
                ev.ArtifactPublished(
                    run_id=run_id,
                    stage=stage,
                    job=job.name,
                    name=item.name,
                    artifact_kind=item.kind,
                    digest=item.digest,
                    size=item.size,
                    path=item.path,
                    provenance=item.provenance,
                )
            ),
        )

    def _receive_artifacts(
        self, run: _StageRun, state: _JobState, workspace: str
    ) -> dict[str, str]:
        """Put the artifacts the job receives in its folder of the workspace, verified by digest.

        A job receives every artifact of the earlier stages and those of the jobs it needs
        (directly or not) in its own stage. Returns the ``CONVEYOR_ARTIFACT_*`` variables.
        """
        if not self._published:
            state.inputs = []
            return {}
        assert self.artifacts is not None
        ancestors = run.ancestors(state.spec.name)
        chosen = [
            item
            for stage, item in self._published.values()
            if stage != run.stage.name or item.job in ancestors
        ]
        state.inputs = chosen
        spec = run.request.spec
        env: dict[str, str] = {}
        folder = f"{workspace}/{ARTIFACTS_DIR}/{state.spec.name}.{state.attempt}"
        for item in chosen:
            dest = f"{folder}/{item.name}"
            if item.kind == "file":
                dest = f"{dest}/{item.path.rsplit('/', 1)[-1]}"
            self.artifacts.export(item.digest, item.kind, dest)
            variable = spec.artifact(item.name).env_name
            env[variable] = dest
            env[variable + "_DIGEST"] = item.digest
        return env

    def _publish_outputs(self, run: _StageRun, state: _JobState) -> list[ev.ArtifactPublished]:
        """Store the job's declared outputs and sign their provenance (the engine does, not
        the job: the key never reaches a job)."""
        assert self.artifacts is not None and self.attestor is not None
        request, job = run.request, state.spec
        workspace = self.workspace.path()
        finished_at = self.clock.now()
        events = []
        for name in job.outputs:
            artifact = request.spec.artifact(name)
            try:
                blob = self.artifacts.publish(workspace, artifact.path, artifact.kind)
            except ArtifactError as exc:
                raise ArtifactError(
                    f"output '{name}' of job '{job.name}': {exc.message}", hint=exc.hint
                ) from exc
            try:
                statement = self._statement(run, state, name, blob.digest, finished_at)
            except ValueError as exc:
                raise ArtifactError(f"cannot write the provenance of '{name}': {exc}") from exc
            events.append(
                ev.ArtifactPublished(
                    run_id=request.run_id,
                    stage=run.stage.name,
                    job=job.name,
                    name=name,
                    artifact_kind=artifact.kind,
                    digest=blob.digest,
                    size=blob.size,
                    path=artifact.path,
                    provenance=self.attestor.attest(statement),
                )
            )
        return events

    def _statement(
        self, run: _StageRun, state: _JobState, name: str, digest: str, finished_at: str
    ) -> dict[str, Any]:
        """The in-toto statement of one output (see ``conveyor.domain.provenance``)."""
        from conveyor.domain.provenance import build_statement

        assert self.attestor is not None
        request, job = run.request, state.spec
        artifact = request.spec.artifact(name)
        return build_statement(
            name=name,
            digest=digest,
            builder_id=self.attestor.builder_id,
            repository=request.repository,
            revision=request.source.revision,
            pipeline_file=request.spec.source,
            pipeline_digest=request.spec.digest,
            stage=run.stage.name,
            job=job.name,
            parameters={
                "run": job.run,
                "env": dict(sorted({**request.spec.env, **job.env}.items())),
                "path": artifact.path,
                "kind": artifact.kind,
                "cache_key": state.key,
                "dirty": request.source.dirty,
            },
            dependencies=[{"name": item.name, "digest": item.digest} for item in state.inputs],
            run_id=request.run_id,
            started_at=state.started_at,
            finished_at=finished_at,
            conveyor_version=__version__,
        )

    def _read_tests(self, state: _JobState) -> ReportResult:
        """The attempt's JUnit results; the problems met are noted in its log (still open)."""
        result = self.reports.read_junit(self.workspace.path(), state.spec.junit)
        for problem in result.problems:
            self._note(state, f"JUnit reports: {problem}")
        return result

    def _report_tests(self, run: _StageRun, state: _JobState, result: ReportResult) -> None:
        mask = self._masker.mask_text
        cut = self._masker.mask_cut  # the reader may have cut these short, inside a secret
        tests = [
            {
                "name": cut(t.name),
                "classname": cut(t.classname),
                "file": cut(t.file),
                "outcome": t.outcome,
                "duration_s": t.duration_s,
                "message": cut(t.message),
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
                truncated=result.truncated,
            )
        )


def _record_of(event: ev.ArtifactPublished) -> ArtifactRecord:
    """What the engine remembers of an artifact this run published (to hand it on)."""
    from conveyor.domain.delivery import ArtifactRecord

    return ArtifactRecord(
        event.name,
        event.artifact_kind,
        event.digest,
        event.size,
        event.path,
        event.provenance,
        event.job,
        event.run_id,
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
        self.env_head: dict[str, str] | None = None
        self.env_tail: dict[str, str] = {}

    def release(self, name: str) -> None:
        """``name`` passed: its dependants whose needs are all met become ready."""
        for dependant in self.dependants[name]:
            self.unmet[dependant] -= 1
            if self.unmet[dependant] == 0:
                heapq.heappush(self.ready, (self.index[dependant], dependant))

    def ancestors(self, name: str) -> set[str]:
        """Every job ``name`` needs, directly or not."""
        seen: set[str] = set()
        stack = list(self.stage.job(name).needs)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.stage.job(current).needs)
        return seen

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
