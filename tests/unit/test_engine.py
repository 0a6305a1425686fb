"""The engine against in-memory fakes: ordering, parallelism, stop-the-line, retries, cache."""

from __future__ import annotations

from typing import Any

from conveyor.domain import events as ev
from conveyor.domain.ports import SourceSnapshot
from conveyor.engine.engine import Engine, RunOptions, RunRequest
from conveyor.errors import SourceError
from conveyor.spec.models import ArtifactSpec, JobSpec, PipelineSpec, StageSpec
from tests.fakes import (
    FakeAttestor,
    FakeExecutor,
    FixedWorkspace,
    Flag,
    FrozenClock,
    InMemoryRecord,
    MemoryArtifactStore,
    MemoryLogStore,
    NoReports,
    RecordingObserver,
    Script,
)


def job(name: str, stage: str, *needs: str, **kw: object) -> JobSpec:
    return JobSpec(name=name, stage=stage, run=f"run {name}", needs=needs, **kw)  # type: ignore[arg-type]


def pipeline(
    *stages: tuple[str, list[JobSpec]],
    secrets: tuple[str, ...] = (),
    artifacts: tuple[ArtifactSpec, ...] = (),
) -> PipelineSpec:
    return PipelineSpec(
        name="p",
        stages=tuple(StageSpec(name, tuple(jobs)) for name, jobs in stages),
        secrets=secrets,
        digest="sha256:" + "0" * 64,
        artifacts=artifacts,
    )


class Harness:
    def __init__(self, scripts: dict[str, list[Script]] | None = None) -> None:
        self.clock = FrozenClock()
        self.record = InMemoryRecord()
        self.executor = FakeExecutor(self.clock, scripts)
        self.logs = MemoryLogStore()
        self.observer = RecordingObserver()
        self.cancel = Flag()
        self.artifacts = MemoryArtifactStore()
        self.attestor = FakeAttestor()

    def run(
        self,
        spec: PipelineSpec,
        secrets: dict[str, str] | None = None,
        workspace: Any = None,
        **options: object,
    ) -> str:
        engine = Engine(
            record=self.record,
            executor=self.executor,
            logs=self.logs,
            reports=NoReports(),
            workspace=workspace or FixedWorkspace(),
            clock=self.clock,
            observer=self.observer,
            cancel=self.cancel,
            artifacts=self.artifacts,
            attestor=self.attestor,
        )
        request = RunRequest(
            run_id=self.record.allocate_run_id(),
            spec=spec,
            source=SourceSnapshot(revision="a" * 40, tree_id="t1"),
            actor="me",
            owner={"pid": 1, "token": "tok"},
            base_env={"PATH": "/bin"},
            secrets=secrets or {},
            home="/home",
            options=RunOptions(**options),  # type: ignore[arg-type]
            repository="file:///repo",
        )
        return engine.run(request)

    def statuses(self, run_id: int | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for e in self.record.events:
            if run_id is not None and e.run_id != run_id:
                continue
            if isinstance(e, ev.JobFinished | ev.JobSkipped | ev.JobCached):
                out[e.job] = getattr(
                    e, "status", "skipped" if isinstance(e, ev.JobSkipped) else "cached"
                )
        return out


def test_stages_run_in_order_and_needs_are_respected() -> None:
    h = Harness()
    spec = pipeline(
        ("commit", [job("build", "commit"), job("unit", "commit", "build")]),
        ("acceptance", [job("smoke", "acceptance")]),
    )
    assert h.run(spec) == "succeeded"
    order = [launch.key for launch in h.executor.started]
    assert order == ["build#1", "unit#1", "smoke#1"]
    assert h.statuses() == {"build": "succeeded", "unit": "succeeded", "smoke": "succeeded"}


def test_parallelism_is_capped() -> None:
    h = Harness()
    spec = pipeline(("s", [job(f"j{i}", "s") for i in range(7)]))
    assert h.run(spec, max_parallel=3) == "succeeded"
    assert h.executor.max_concurrent == 3


def test_failed_stage_stops_the_line() -> None:
    h = Harness({"build": [Script(code=2)]})
    spec = pipeline(
        ("commit", [job("build", "commit"), job("unit", "commit", "build"), job("lint", "commit")]),
        ("acceptance", [job("smoke", "acceptance")]),
    )
    assert h.run(spec) == "failed"
    st = h.statuses()
    assert st["build"] == "failed"
    assert st["unit"] == "skipped"
    assert st["lint"] == "succeeded"  # independent jobs of the failed stage still run
    assert st["smoke"] == "skipped"
    finished = h.record.of(ev.StageFinished)
    assert [(e.stage, e.status) for e in finished] == [
        ("commit", "failed"),  # type: ignore[attr-defined]
        ("acceptance", "skipped"),
    ]


def test_a_workspace_that_cannot_be_prepared_fails_the_job_with_a_true_duration() -> None:
    class BrokenWorkspace:
        def path(self) -> str:
            raise SourceError("cannot check out abc into /ws: fatal: bad object")

    h = Harness()
    h.clock.t = 50_000.0  # the monotonic clock is far from zero, as on a machine up for hours
    assert h.run(pipeline(("commit", [job("build", "commit")])), workspace=BrokenWorkspace()) == (
        "failed"
    )
    finished = h.record.of(ev.JobFinished)[0]
    assert finished.status == "failed" and finished.exit_code is None  # type: ignore[attr-defined]
    assert finished.duration_s < 1  # type: ignore[attr-defined]
    assert finished.attempt["duration_s"] < 1  # type: ignore[attr-defined]
    assert b"cannot check out abc" in h.logs.logs[("build", 1)].data


def test_a_job_cancelled_before_its_process_starts_has_a_true_duration() -> None:
    class BrokenWorkspace:
        def path(self) -> str:
            raise SourceError("cannot check out abc into /ws: fatal: bad object")

    h = Harness()
    h.clock.t = 50_000.0
    spec = pipeline(("commit", [job("a", "commit"), job("b", "commit")]))
    assert h.run(spec, workspace=BrokenWorkspace(), fail_fast=True) == "failed"
    for finished in h.record.of(ev.JobFinished):
        assert finished.duration_s < 1, finished  # type: ignore[attr-defined]


def test_allow_failure_does_not_fail_the_stage() -> None:
    h = Harness({"flaky": [Script(code=1)]})
    spec = pipeline(("s", [job("flaky", "s", allow_failure=True), job("ok", "s")]))
    assert h.run(spec) == "succeeded"


def test_retries_then_success() -> None:
    h = Harness({"unit": [Script(code=1), Script(code=0)]})
    spec = pipeline(("s", [job("unit", "s", retries=1)]))
    assert h.run(spec) == "succeeded"
    attempts = [
        *h.record.of(ev.JobAttemptFinished),
        *[
            ev.JobAttemptFinished(run_id=1, stage="s", job="unit", **e.attempt)  # type: ignore[attr-defined]
            for e in h.record.of(ev.JobFinished)
        ],
    ]
    assert [(a.attempt, a.status) for a in attempts] == [(1, "failed"), (2, "succeeded")]  # type: ignore[attr-defined]
    finished = h.record.of(ev.JobFinished)[0]
    assert finished.attempts == 2  # type: ignore[attr-defined]


def test_timeout_kills_and_records_timed_out() -> None:
    h = Harness({"slow": [Script(hang=True)]})
    spec = pipeline(("s", [job("slow", "s", timeout_s=5.0)]))
    assert h.run(spec) == "failed"
    assert h.statuses()["slow"] == "timed_out"
    assert h.executor.killed[0] == ("slow#1", False)


def test_a_retry_after_a_timeout_gets_its_own_deadline_and_runs() -> None:
    h = Harness({"slow": [Script(hang=True), Script(code=0)]})
    spec = pipeline(("s", [job("slow", "s", timeout_s=5.0, retries=1)]))
    assert h.run(spec) == "succeeded"
    assert [launch.key for launch in h.executor.started] == ["slow#1", "slow#2"]
    finished = h.record.of(ev.JobFinished)[0]
    assert finished.attempts == 2 and finished.attempt["status"] == "succeeded"  # type: ignore[attr-defined]


def test_a_cancel_during_the_checkout_cancels_the_run_before_any_job_starts() -> None:
    h = Harness()

    class SlowCheckout:
        def path(self) -> str:
            h.cancel.value = True  # Ctrl-C while git checks out
            return "/workspace"

    spec = pipeline(("s", [job("a", "s"), job("b", "s", "a")]), ("t", [job("c", "t")]))
    assert h.run(spec, workspace=SlowCheckout()) == "cancelled"
    assert h.executor.started == []
    assert h.statuses() == {"a": "cancelled", "b": "skipped", "c": "skipped"}


def test_fail_fast_cancels_running_jobs() -> None:
    h = Harness({"bad": [Script(code=1, ticks=1)], "long": [Script(hang=True)]})
    spec = pipeline(("s", [job("long", "s"), job("bad", "s"), job("later", "s", "long")]))
    assert h.run(spec, fail_fast=True) == "failed"
    st = h.statuses()
    assert st == {"bad": "failed", "long": "cancelled", "later": "skipped"}


def test_cancel_request_cancels_the_run() -> None:
    h = Harness({"long": [Script(hang=True)]})
    spec = pipeline(("s", [job("long", "s"), job("after", "s", "long")]), ("t", [job("x", "t")]))
    original_poll = h.executor.poll

    def poll(timeout: float | None) -> list:  # type: ignore[type-arg]
        h.cancel.value = True
        return original_poll(timeout)

    h.executor.poll = poll  # type: ignore[method-assign]
    assert h.run(spec) == "cancelled"
    assert h.statuses() == {"long": "cancelled", "after": "skipped", "x": "skipped"}
    assert h.record.of(ev.RunFinished)[0].status == "cancelled"  # type: ignore[attr-defined]
    assert h.executor.closed


def test_cache_hit_on_second_run_and_dependants_follow() -> None:
    h = Harness()
    spec = pipeline(("s", [job("a", "s"), job("b", "s", "a")]))
    assert h.run(spec) == "succeeded"
    started = len(h.executor.started)
    assert h.run(spec) == "succeeded"
    assert len(h.executor.started) == started  # nothing ran again
    cached = h.record.of(ev.JobCached)
    assert {(c.job, c.source_run) for c in cached} == {("a", 1), ("b", 1)}  # type: ignore[attr-defined]
    assert h.run(spec, use_cache=False) == "succeeded"
    assert len(h.executor.started) == started + 2


def test_cache_false_always_runs() -> None:
    h = Harness()
    spec = pipeline(("s", [job("a", "s", cache=False)]))
    h.run(spec)
    h.run(spec)
    assert len(h.executor.started) == 2


def test_what_depends_on_an_uncached_job_is_not_taken_from_the_cache() -> None:
    """A `cache: false` job does something new each time: its dependants run again too."""
    h = Harness()
    spec = pipeline(
        ("s", [job("build", "s", cache=False), job("test", "s", "build"), job("lint", "s")]),
        ("later", [job("deploy", "later")]),
    )
    h.run(spec)
    h.run(spec)
    ran = [launch.key.split("#")[0] for launch in h.executor.started]
    assert ran.count("build") == 2 and ran.count("test") == 2
    assert ran.count("lint") == 1 and ran.count("deploy") == 1  # no artifact links them


def test_uncached_sources_follow_needs_and_artifacts() -> None:
    from conveyor.engine.planning import uncached_sources
    from conveyor.spec.models import ArtifactSpec

    spec = pipeline(
        ("pre", [job("early", "pre")]),
        (
            "s",
            [
                job("gen", "s", cache=False),
                job("mid", "s", "gen"),
                job("top", "s", "mid", outputs=("app",)),
                job("side", "s"),
            ],
        ),
        ("ship", [job("up", "ship")]),
        artifacts=(ArtifactSpec(name="app", path="dist/app", kind="file"),),
    )
    # `top` publishes an artifact built from gen's result: every later job's key includes it.
    assert uncached_sources(spec) == {"mid": "gen", "top": "gen", "up": "gen"}


def test_secrets_are_passed_and_masked_across_writes() -> None:
    h = Harness({"leak": [Script(output=[b"token=sup", b"ersecret!\n"])]})
    spec = pipeline(("s", [job("leak", "s")]), secrets=("TOKEN",))
    h.run(spec, secrets={"TOKEN": "supersecret"})
    assert h.executor.started[0].env["TOKEN"] == "supersecret"
    log = h.logs.logs[("leak", 1)].data
    assert log == b"token=***!\n"
    assert "supersecret" not in "".join(text for _, text in h.observer.output)


def test_job_environment() -> None:
    h = Harness()
    spec = pipeline(("commit", [job("build", "commit", env={"A": "1"})]))
    h.run(spec)
    env = h.executor.started[0].env
    assert env["CONVEYOR_RUN_ID"] == "1"
    assert env["CONVEYOR_REVISION"] == "a" * 40
    assert env["CONVEYOR_STAGE"] == "commit"
    assert env["CONVEYOR_JOB"] == "build"
    assert env["CONVEYOR_WORKSPACE"] == "/workspace"
    assert env["A"] == "1"


def test_every_event_is_committed_before_the_engine_acts_on_it() -> None:
    h = Harness()
    spec = pipeline(("s", [job("a", "s"), job("b", "s", "a")]))
    committed_at_spawn: dict[str, list[str]] = {}
    original_start = h.executor.start

    def start(launch):  # type: ignore[no-untyped-def]
        committed_at_spawn[launch.key] = [
            f"{e.kind}:{getattr(e, 'job', '')}" for e in h.record.events
        ]
        return original_start(launch)

    h.executor.start = start  # type: ignore[method-assign]
    h.run(spec)
    # b is spawned only after a's end and b's own start are on the record.
    assert "job.finished:a" in committed_at_spawn["b#1"]
    assert "job.attempt.started:b" in committed_at_spawn["b#1"]
    assert "job.attempt.started:a" in committed_at_spawn["a#1"]


def test_selected_stage_only() -> None:
    h = Harness()
    spec = pipeline(("a", [job("x", "a")]), ("b", [job("y", "b")]))
    assert h.run(spec, stages=("b",)) == "succeeded"
    assert h.statuses() == {"x": "skipped", "y": "succeeded"}


# -- artifacts -------------------------------------------------------------------------------

APP = ArtifactSpec("app", "dist/app.bin")
SITE = ArtifactSpec("my-site", "site", "dir")


def artifact_pipeline() -> PipelineSpec:
    return pipeline(
        (
            "commit",
            [
                job("build", "commit", outputs=("app",)),
                job("docs", "commit", outputs=("my-site",)),
                job("check", "commit", "build"),
                job("alone", "commit"),
            ],
        ),
        ("acceptance", [job("e2e", "acceptance")]),
        artifacts=(APP, SITE),
    )


def launched_env(h: Harness, name: str) -> dict[str, str]:
    started = reversed(h.executor.started)
    return dict(next(x for x in started if x.key.startswith(name + "#")).env)


def test_outputs_are_published_signed_and_handed_on() -> None:
    h = Harness()
    h.artifacts.files = {"dist/app.bin": b"app-bytes", "site": b"site-tar"}
    assert h.run(artifact_pipeline()) == "succeeded"
    published = {e.name: e for e in h.record.of(ev.ArtifactPublished)}
    assert set(published) == {"app", "my-site"}
    digest = published["app"].digest
    # The needing job of the same stage and every later job get it; an unrelated job does not.
    check = launched_env(h, "check")
    assert check["CONVEYOR_ARTIFACT_APP_DIGEST"] == digest
    assert check["CONVEYOR_ARTIFACT_APP"] == "/workspace/.conveyor-artifacts/check.1/app/app.bin"
    assert "CONVEYOR_ARTIFACT_MY_SITE" not in check
    assert "CONVEYOR_ARTIFACT_APP" not in launched_env(h, "alone")
    e2e = launched_env(h, "e2e")
    assert e2e["CONVEYOR_ARTIFACT_APP_DIGEST"] == digest
    assert e2e["CONVEYOR_ARTIFACT_MY_SITE"] == "/workspace/.conveyor-artifacts/e2e.1/my-site"
    # Published in the same commit as, and before, the producer's JobFinished.
    commit = next(
        c for c in h.record.commits if any(isinstance(e, ev.ArtifactPublished) for e in c)
    )
    kinds = [type(e).__name__ for e in commit]
    assert kinds.index("ArtifactPublished") < kinds.index("JobFinished")
    statement = h.attestor.statements[0]
    assert statement["subject"][0]["digest"]["sha256"] == digest.removeprefix("sha256:")


def test_a_missing_output_fails_the_job_and_stops_the_line() -> None:
    h = Harness()
    h.artifacts.files = {"site": b"site-tar"}
    assert h.run(artifact_pipeline()) == "failed"
    statuses = h.statuses()
    assert statuses["build"] == "failed"
    assert statuses["check"] == "skipped"
    assert statuses["e2e"] == "skipped"
    assert b"was not produced" in h.logs.logs[("build", 1)].data


def test_a_cache_hit_hands_on_the_original_artifacts() -> None:
    h = Harness()
    h.artifacts.files = {"dist/app.bin": b"v1", "site": b"s"}
    assert h.run(artifact_pipeline()) == "succeeded"
    h.artifacts.files = {"dist/app.bin": b"v2", "site": b"s2"}  # a rebuild would differ
    assert h.run(artifact_pipeline()) == "succeeded"
    second = [e for e in h.record.of(ev.ArtifactPublished) if e.run_id == 2]
    assert {e.name: e.source_run for e in second} == {"app": 1, "my-site": 1}
    first = {e.name: e.digest for e in h.record.of(ev.ArtifactPublished) if e.run_id == 1}
    assert {e.name: e.digest for e in second} == first
    assert len(h.executor.started) == 5  # run 2 started nothing: every job was cached


def test_a_cache_hit_whose_blob_is_gone_runs_again() -> None:
    h = Harness()
    h.artifacts.files = {"dist/app.bin": b"v1", "site": b"s"}
    assert h.run(artifact_pipeline()) == "succeeded"
    h.artifacts.blobs.clear()
    assert h.run(artifact_pipeline()) == "succeeded"
    assert h.statuses(2)["build"] == "succeeded"


def test_strays_are_swept_at_the_end_of_each_stage_and_of_a_killed_attempt() -> None:
    h = Harness({"slow": [Script(hang=True)]})
    spec = pipeline(("a", [job("x", "a")]), ("b", [job("y", "b")]))
    h.run(spec)
    assert h.executor.sweeps == 2
    h = Harness({"slow": [Script(hang=True)]})
    h.run(pipeline(("a", [job("slow", "a", timeout_s=5.0)])))
    assert h.statuses() == {"slow": "timed_out"}
    assert h.executor.sweeps == 2  # the killed attempt, then the stage
