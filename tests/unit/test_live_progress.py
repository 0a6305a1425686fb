"""The live view stays readable when many jobs fail."""

from __future__ import annotations

import io

from rich.console import Console

from conveyor.cli.progress import TAILS_SHOWN, LiveProgress, RunView
from conveyor.domain import events as ev


def _view_with_failures(count: int) -> RunView:
    view = RunView()
    names = [f"f{i}" for i in range(count)]
    view.apply(
        ev.RunStarted(
            run_id=1,
            pipeline="many",
            revision="a" * 40,
            pipeline_file="conveyor.yml",
            pipeline_digest="sha256:0",
            dirty=False,
            actor="me",
            stages=[{"name": "s", "jobs": names}],
            owner={},
        )
    )
    view.apply(ev.StageStarted(run_id=1, stage="s"))
    for name in names:
        view.apply(
            ev.JobAttemptStarted(run_id=1, stage="s", job=name, attempt=1, cache_key="k", log="l")
        )
        view.output(name, f"boom from {name}\n")
        view.apply(
            ev.JobFinished(
                run_id=1,
                stage="s",
                job=name,
                status="failed",
                exit_code=3,
                attempts=1,
                duration_s=0.1,
                cache_key="k",
            )
        )
    return view


def _render(view: RunView) -> str:
    live = LiveProgress.__new__(LiveProgress)  # not started: no terminal needed
    live.view = view
    live.console = Console(file=io.StringIO(), width=100, height=60, color_system=None)
    live.console.print(live._render())
    out = live.console.file.getvalue()
    assert isinstance(out, str)
    return out


def test_the_log_tails_of_a_few_failed_jobs_are_shown() -> None:
    out = _render(_view_with_failures(2))
    assert "f0: last lines of the log" in out and "boom from f1" in out
    assert "more failed jobs" not in out


def test_many_failed_jobs_show_a_few_tails_and_a_count() -> None:
    out = _render(_view_with_failures(TAILS_SHOWN + 7))
    assert out.count("last lines of the log") == TAILS_SHOWN
    assert "and 7 more failed jobs" in out
