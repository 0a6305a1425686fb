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


def test_plain_output_shows_an_unfinished_line_when_its_attempt_ends() -> None:
    from conveyor.cli.progress import MAX_LINE, PlainProgress

    out = io.StringIO()
    plain = PlainProgress(out)
    plain.on_event(
        ev.RunStarted(
            run_id=1,
            pipeline="p",
            revision="a" * 40,
            pipeline_file="conveyor.yml",
            pipeline_digest="sha256:0",
            dirty=False,
            actor="me",
            stages=[{"name": "s", "jobs": ["r"]}],
            owner={},
        )
    )
    for attempt in (1, 2):
        plain.on_event(
            ev.JobAttemptStarted(
                run_id=1, stage="s", job="r", attempt=attempt, cache_key="k", log="l"
            )
        )
        plain.on_output("r", attempt, f"attempt-{attempt}-no-newline")
        ending = dict(
            attempt=attempt,
            status="failed",
            exit_code=1,
            pid=1,
            duration_s=0.1,
            log_bytes=1,
            log_sha256="x",
            log_truncated=False,
        )
        if attempt == 1:
            plain.on_event(ev.JobAttemptFinished(run_id=1, stage="s", job="r", **ending))
        else:
            plain.on_event(
                ev.JobFinished(
                    run_id=1,
                    stage="s",
                    job="r",
                    status="failed",
                    exit_code=1,
                    attempts=2,
                    duration_s=0.2,
                    cache_key="k",
                    attempt=ending,
                )
            )
    lines = out.getvalue().splitlines()
    first = lines.index("  r | attempt-1-no-newline")
    assert lines[first + 1].startswith("  r attempt 1 failed")
    second = lines.index("  r | attempt-2-no-newline")
    assert lines[second + 1].startswith("  r failed (exit 1) in")
    plain.on_output("r", 2, "x" * (MAX_LINE * 2 + 5))  # a line never ended is not kept whole
    assert plain.view.jobs["r"].partial == "x" * 5


def test_an_escape_sequence_split_between_writes_is_still_removed() -> None:
    view = RunView()
    view.apply(
        ev.RunStarted(
            run_id=1,
            pipeline="p",
            revision="a" * 40,
            pipeline_file="conveyor.yml",
            pipeline_digest="sha256:0",
            dirty=False,
            actor="me",
            stages=[{"name": "s", "jobs": ["j"]}],
            owner={},
        )
    )
    assert view.output("j", "red: \x1b") == []
    assert view.output("j", "[31mtext\x1b[0m done\n") == ["red: text done"]
    view.output("j", "bell\x07 no newline")
    assert view.end_output("j") == "bell no newline"
