"""Live feedback during a run: a rich live view on a terminal, plain lines otherwise.

Both are ``Observer`` implementations. Job output is already masked by the engine; here it is
neutralised (escape sequences and control characters removed) before it reaches the terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Any

from conveyor.domain import events as ev
from conveyor.domain.text import neutralise

TAIL_LINES = 12
MAX_LINE = 64 * 1024
"""Characters of an unfinished output line kept before it is shown as a line of its own."""
SYMBOLS = {
    "pending": "·",
    "running": "▶",
    "succeeded": "✓",
    "cached": "↺",
    "failed": "✗",
    "timed_out": "⏱",
    "cancelled": "⊘",
    "skipped": "-",
    "interrupted": "!",
}


@dataclass
class _Job:
    """What the progress view shows of one job."""

    stage: str
    status: str = "pending"
    attempt: int = 0
    started: float | None = None
    ended: float | None = None
    detail: str = ""
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    partial: str = ""
    """The unfinished last line, as written (neutralised when it is shown: an escape sequence
    may be split between two writes)."""


class RunView:
    """What both views know about the run, built from events and output."""

    def __init__(self) -> None:
        self.run_id: int | None = None
        self.pipeline = ""
        self.revision = ""
        self.stages: list[str] = []
        self.stage_status: dict[str, str] = {}
        self.jobs: dict[str, _Job] = {}
        self.started = time.monotonic()
        self.status = "running"
        self.current_stage = ""
        self.notes: dict[str, str] = {}
        """The latest note of each deploy stage (what the deployment is doing)."""

    def apply(self, event: ev.Event) -> None:
        """Update from one recorded event."""
        now = time.monotonic()
        if isinstance(event, ev.RunStarted):
            self.run_id = event.run_id
            self.pipeline = event.pipeline
            self.revision = event.revision
            for stage in event.stages:
                self.stages.append(stage["name"])
                self.stage_status[stage["name"]] = "pending"
                for job in stage["jobs"]:
                    self.jobs[job] = _Job(stage["name"])
        elif isinstance(event, ev.StageStarted):
            self.stage_status[event.stage] = "running"
            self.current_stage = event.stage
        elif isinstance(event, ev.StageFinished):
            self.stage_status[event.stage] = event.status
            if event.reason:
                self.notes[event.stage] = event.reason
        elif isinstance(event, ev.JobAttemptStarted):
            job = self.jobs[event.job]
            job.status, job.attempt = "running", event.attempt
            job.started = job.started or now
            job.detail = f"attempt {event.attempt}" if event.attempt > 1 else ""
        elif isinstance(event, ev.JobAttemptFinished):
            self.end_output(event.job)
            job = self.jobs[event.job]
            if event.status != "succeeded":
                job.detail = f"attempt {event.attempt} {event.status} (exit {event.exit_code})"
        elif isinstance(event, ev.JobFinished):
            self.end_output(event.job)
            job = self.jobs[event.job]
            job.status, job.ended = event.status, now
            if event.status not in ("succeeded", "cached"):
                job.detail = f"{event.status} (exit {event.exit_code})" + (
                    f" after {event.attempts} attempts" if event.attempts > 1 else ""
                )
        elif isinstance(event, ev.JobCached):
            job = self.jobs[event.job]
            job.status, job.detail = "cached", f"from run {event.source_run}"
        elif isinstance(event, ev.JobSkipped):
            job = self.jobs[event.job]
            job.status, job.detail = "skipped", event.reason
        elif isinstance(event, ev.TestsReported):
            job = self.jobs[event.job]
            job.detail = (
                f"tests: {event.passed} passed, {event.failed} failed, {event.skipped} skipped"
            )
        elif isinstance(event, ev.RunFinished):
            self.status = event.status

    def output(self, job_name: str, text: str) -> list[str]:
        """Add output of a job; returns the complete lines it finished (a line longer than
        ``MAX_LINE`` is cut into pieces: a job need not end its lines)."""
        job = self.jobs[job_name]
        done, newline, job.partial = (job.partial + text).rpartition("\n")
        lines = neutralise(done).split("\n") if newline else []
        while len(job.partial) > MAX_LINE:
            lines.extend(neutralise(job.partial[:MAX_LINE]).split("\n"))
            job.partial = job.partial[MAX_LINE:]
        job.tail.extend(lines)
        return lines

    def end_output(self, job_name: str) -> str | None:
        """The unfinished last line of an attempt that ended (``None`` if there is none)."""
        job = self.jobs.get(job_name)
        if job is None or not job.partial:
            return None
        rest, job.partial = neutralise(job.partial), ""
        job.tail.append(rest)
        return rest

    def duration(self, job: _Job) -> str:
        if job.started is None:
            return ""
        end = job.ended if job.ended is not None else time.monotonic()
        return f"{end - job.started:.1f}s"


class PlainProgress:
    """Line-oriented output for logs and pipes: one line per state change or output line."""

    def __init__(self, stream: IO[str] | None = None, show_output: bool = True) -> None:
        self.view = RunView()
        self.stream = stream or sys.stdout
        self.show_output = show_output

    def _print(self, text: str) -> None:
        try:
            self.stream.write(text + "\n")
        except BrokenPipeError:
            self._reader_gone()

    def _flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        """Whoever read the output stopped (``conveyor run | head``): the run goes on, and is
        recorded, without output."""
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(null, self.stream.fileno())
        finally:
            os.close(null)

    def on_event(self, event: ev.Event) -> None:
        if isinstance(event, (ev.JobAttemptFinished, ev.JobFinished)):
            rest = self.view.end_output(event.job)
            if rest is not None and self.show_output:
                self._print(f"  {event.job} | {rest}")
        self.view.apply(event)
        if isinstance(event, ev.RunStarted):
            self._print(
                f"run {event.run_id}: pipeline '{event.pipeline}' at {event.revision[:12]}"
                + (" (dirty working tree)" if event.dirty else "")
            )
        elif isinstance(event, ev.StageStarted):
            self._print(f"stage {event.stage}")
        elif isinstance(event, ev.StageFinished):
            reason = f": {event.reason}" if event.reason else ""
            self._print(f"stage {event.stage} {event.status}{reason}")
        elif isinstance(event, ev.JobAttemptStarted):
            suffix = f" (attempt {event.attempt})" if event.attempt > 1 else ""
            self._print(f"  {event.job} started{suffix}")
        elif isinstance(event, ev.JobAttemptFinished) and event.status != "succeeded":
            self._print(
                f"  {event.job} attempt {event.attempt} {event.status} (exit {event.exit_code})"
            )
        elif isinstance(event, ev.JobFinished):
            job = self.view.jobs[event.job]
            code = (
                f" (exit {event.exit_code})"
                if event.status not in ("succeeded", "cached") and event.exit_code is not None
                else ""
            )
            self._print(f"  {event.job} {event.status}{code} in {event.duration_s:.2f}s")
            if event.status not in ("succeeded", "cached") and job.tail and not self.show_output:
                for line in job.tail:
                    self._print(f"  {event.job} | {line}")
        elif isinstance(event, ev.JobCached):
            self._print(f"  {event.job} cached (same inputs as run {event.source_run})")
        elif isinstance(event, ev.JobSkipped):
            self._print(f"  {event.job} skipped: {event.reason}")
        elif isinstance(event, ev.TestsReported):
            self._print(
                f"  {event.job} tests: {event.passed} passed, {event.failed} failed,"
                f" {event.skipped} skipped"
            )
            for problem in event.problems:
                self._print(f"  {event.job} reports: {neutralise(problem)}")
        self._flush()

    def on_note(self, text: str) -> None:
        self._print(f"  {text}")
        self._flush()

    def on_output(self, job: str, attempt: int, text: str) -> None:
        lines = self.view.output(job, text)
        if self.show_output:
            for line in lines:
                self._print(f"  {job} | {line}")
            self._flush()

    def close(self) -> None:
        """Print what is left of partial lines."""
        for name, job in self.view.jobs.items():
            if job.partial and self.show_output:
                self._print(f"  {name} | {neutralise(job.partial)}")
                job.partial = ""


class QuietProgress:
    """No feedback while the run goes on (``--progress quiet``); the summary still prints."""

    def on_event(self, event: ev.Event) -> None:
        pass

    def on_note(self, text: str) -> None:
        pass

    def on_output(self, job: str, attempt: int, text: str) -> None:
        pass

    def close(self) -> None:
        pass


TAILS_SHOWN = 3
"""Failed jobs whose log tail the live view shows (a matrix of failures would not fit)."""


class LiveProgress:
    """A rich live table of stages and jobs, with the log tail of failing jobs."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.view = RunView()
        self.console = Console()
        self.live = Live(
            console=self.console, refresh_per_second=8, transient=False, get_renderable=self._render
        )
        self.live.start()

    def on_event(self, event: ev.Event) -> None:
        self.view.apply(event)

    def on_note(self, text: str) -> None:
        self.view.notes[self.view.current_stage] = text

    def on_output(self, job: str, attempt: int, text: str) -> None:
        self.view.output(job, text)

    def close(self) -> None:
        self.live.refresh()
        self.live.stop()
        if not self.console.is_terminal:  # the last frame ends its line, as on a terminal
            self.console.file.write("\n")

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        view = self.view
        title = f"run {view.run_id} · {view.pipeline} · {view.revision[:12]}"
        table = Table(title=title, title_justify="left", expand=False, box=None, padding=(0, 1))
        table.add_column("stage")
        table.add_column("job")
        table.add_column("state")
        table.add_column("time", justify="right")
        table.add_column("detail", overflow="ellipsis", max_width=60)
        styles = {
            "succeeded": "green",
            "cached": "cyan",
            "failed": "red",
            "timed_out": "red",
            "running": "yellow",
            "cancelled": "magenta",
            "skipped": "dim",
        }
        # A big pipeline does not fit: then show the stage's counts, and only the jobs that
        # are running or did not pass.
        room = max(8, self.console.size.height - 8)
        compact = len(view.jobs) > room
        for stage in view.stages:
            first = True
            stage_jobs = [(n, j) for n, j in view.jobs.items() if j.stage == stage]
            if not stage_jobs:  # a deploy stage
                status = view.stage_status.get(stage, "pending")
                table.add_row(
                    Text(stage, style="bold"),
                    Text("deploy"),
                    Text(f"{SYMBOLS.get(status, '?')} {status}", style=styles.get(status, "")),
                    "",
                    Text(view.notes.get(stage, ""), style="dim"),
                )
                continue
            if compact:
                counts: dict[str, int] = {}
                for _, job in stage_jobs:
                    counts[job.status] = counts.get(job.status, 0) + 1
                summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
                table.add_row(
                    Text(stage, style="bold"),
                    Text(f"{len(stage_jobs)} jobs"),
                    Text(view.stage_status.get(stage, "")),
                    "",
                    Text(summary),
                )
                first = False
                stage_jobs = [
                    (n, j)
                    for n, j in stage_jobs
                    if j.status in ("running", "failed", "timed_out", "cancelled")
                ][: max(1, room // max(1, len(view.stages)))]
            for name, job in stage_jobs:
                state = Text(
                    f"{SYMBOLS.get(job.status, '?')} {job.status}", style=styles.get(job.status, "")
                )
                detail = job.detail
                if job.status == "running" and not detail and job.tail:
                    detail = job.tail[-1]
                table.add_row(
                    Text(stage if first else "", style="bold"),
                    Text(name),
                    state,
                    view.duration(job),
                    Text(detail, style="dim" if detail is not job.detail else ""),
                )
                first = False
        parts: list[Any] = [table]
        failing = [
            (name, job)
            for name, job in view.jobs.items()
            if job.status in ("failed", "timed_out") and job.tail
        ]
        for name, job in failing[:TAILS_SHOWN]:
            parts.append(Text(f"── {name}: last lines of the log ──", style="red"))
            parts.append(Text("\n".join(job.tail)))
        more = len(failing) - TAILS_SHOWN
        if more > 0:
            parts.append(
                Text(f"── and {more} more failed job{'s' if more > 1 else ''} ──", style="red")
            )
        return Group(*parts)
