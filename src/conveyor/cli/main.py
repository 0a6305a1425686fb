"""The ``conveyor`` command line.

Exit codes: 0 success, 1 the pipeline failed (or a runtime fault), 2 usage or configuration
error, 130 cancelled. Heavy modules (rich, the store, the engine) are imported inside the
commands that need them, so ``conveyor validate`` starts fast.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from conveyor import __version__
from conveyor.cli.common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    echo_json,
    file_option,
    home_of,
    home_option,
    json_option,
    not_empty,
    open_record_at,
    repo_root,
    run_id_of,
)
from conveyor.errors import ConveyorError, SpecError, UsageError


def _pipeline_path(root: Path, pipeline_file: str) -> tuple[Path, str]:
    path = Path(pipeline_file)
    full = path if path.is_absolute() else (Path.cwd() / path)
    if not full.exists() and not path.is_absolute():
        full = root / path
    full = full.resolve()
    try:
        rel = full.relative_to(root.resolve()).as_posix()
    except ValueError as exc:
        raise UsageError(
            f"{pipeline_file} is outside the repository {root}",
            hint="the pipeline file is versioned with the code: keep it in the repository",
        ) from exc
    return full, rel


def _committed_spec(
    source: Any, commit: str, blob: str | None, rel: str, display: str, home: Any
) -> Any:
    from conveyor.bootstrap import load_committed_spec
    from conveyor.errors import SpecError, SpecProblem

    if blob is None:
        raise SpecError(
            [
                SpecProblem(
                    display,
                    1,
                    1,
                    f"{rel} is not in the committed revision {commit[:12]}",
                    hint="commit it (git add && git commit), run with --dirty to use the working"
                    " tree, or `conveyor init` to write one",
                )
            ]
        )
    return load_committed_spec(source, blob, display, home, commit=commit, rel_path=rel)


def _load_for_run(
    pipeline_file: str,
    revision: str | None,
    dirty: bool,
    home_opt: Path | None,
    checkout: bool = False,
) -> tuple[Path, Any, Any, Any, Any, Any]:
    """Root, home, spec, git source, snapshot and (if ``checkout``) the run's workspace, whose
    checkout starts at once in the background, for ``run`` and ``plan``."""
    from conveyor.adapters.git import GitSource, GitWorkspace, discover

    workspace = None

    found = None if dirty else discover(Path.cwd(), revision or "HEAD", pipeline_file)
    if found is not None:  # the common case, in one git call
        source, rel, commit, tree, blob = found
        root = source.root
        home = home_of(home_opt, root)
        if checkout and blob:  # at once: the checkout overlaps with loading the rest
            workspace = GitWorkspace(source, commit, home.workspaces / f".checkout-{os.getpid()}")
            workspace.start()
    try:
        from conveyor.bootstrap import source_snapshot
        from conveyor.spec import load_pipeline_file

        if found is None:
            found_root = repo_root()
            assert found_root is not None
            root = found_root
            home = home_of(home_opt, root)
            full, rel = _pipeline_path(root, pipeline_file)
            source = GitSource(root)
            if dirty:
                if revision:
                    raise UsageError(
                        "--dirty and --revision cannot be combined",
                        hint="--dirty runs the working tree as it is now",
                    )
                spec = load_pipeline_file(full, pipeline_file)
                return root, home, spec, source, source_snapshot(source, None, spec), None
            commit, tree, found_blob = source.resolve_file(revision or "HEAD", rel)
            blob = found_blob or ""
            if checkout and blob:
                workspace = GitWorkspace(
                    source, commit, home.workspaces / f".checkout-{os.getpid()}"
                )
                workspace.start()
        spec = _committed_spec(source, commit, blob or None, rel, pipeline_file, home)
        snapshot = source_snapshot(source, commit, spec, tree)
        if not revision and blob:
            _warn_if_edited(root / rel, blob, pipeline_file)
    except BaseException:
        if workspace is not None:
            workspace.close()
        raise
    return root, home, spec, source, snapshot, workspace


def _warn_if_edited(path: Path, blob: str, shown: str) -> None:
    """Say so when the pipeline file in the working tree is not the committed one (which is
    what runs): `validate` checked the edited file."""
    import hashlib

    try:
        data = path.read_bytes()
    except OSError:
        return
    header = b"blob %d\0" % len(data)
    digest = (hashlib.sha256 if len(blob) == 64 else hashlib.sha1)(header + data).hexdigest()
    if digest != blob:
        click.echo(
            f"warning: {shown} has uncommitted changes; this uses the committed version"
            " (commit the changes, or pass --dirty to use the working tree)",
            err=True,
        )


def _actor(as_user: str | None, root: Path | None) -> str:
    return _actor_lookup(as_user, root)()


def _actor_lookup(as_user: str | None, root: Path | None) -> Callable[[], str]:
    """Who acts: ``--as``, else ``$CONVEYOR_USER``, else git's ``user.email``, else ``$USER``.
    Git is asked at once, in the background; calling the result waits for its answer."""
    if as_user:
        return lambda: as_user
    if os.environ.get("CONVEYOR_USER"):
        return lambda: os.environ["CONVEYOR_USER"]
    import subprocess

    fallback = os.environ.get("USER", "unknown")
    try:
        proc = subprocess.Popen(
            ["git", "config", "user.email"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
            cwd=root,
        )
    except OSError:
        return lambda: fallback

    def answer() -> str:
        out, _ = proc.communicate()
        return out.strip() or fallback

    return answer


# -- commands -------------------------------------------------------------------------------


class LazyGroup(click.Group):
    """A group whose commands in other modules are imported only when used (click's lazy
    loading pattern): ``conveyor run`` does not pay for importing ``promote``."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib

            module, _, name = self.lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), name)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy={
        "artifacts": "conveyor.cli.artifacts:artifacts",
        "keys": "conveyor.cli.artifacts:keys",
        "verify": "conveyor.cli.artifacts:verify",
        "promote": "conveyor.cli.environments:promote",
        "env": "conveyor.cli.environments:env",
        "users": "conveyor.cli.governance:users",
        "approve": "conveyor.cli.governance:approve",
        "override": "conveyor.cli.governance:override",
        "gates": "conveyor.cli.governance:gates",
        "report": "conveyor.cli.governance:report",
        "incident": "conveyor.cli.governance:incident",
        "metrics": "conveyor.cli.governance:metrics",
        "daemon": "conveyor.cli.daemon:daemon",
    },
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="conveyor")
def cli() -> None:
    """Conveyor: one automated path from commit to production.

    Pipelines are defined in conveyor.yml at the repository root. Start with `conveyor init`,
    check with `conveyor validate`, run with `conveyor run`.
    """


STARTER = """\
# Conveyor pipeline: stages run in order, a failed stage stops the line.
# Reference: docs/pipeline.md
pipeline: {name}
env:
  APP_ENV: ci
stages:
  - name: commit
    jobs:
      build:
        run: |
          echo "building $CONVEYOR_PIPELINE at $CONVEYOR_REVISION"
          mkdir -p dist && date -u > dist/build-info.txt
        timeout: 10m
      unit:
        needs: [build]
        run: |
          echo "run your unit tests here, for example:"
          echo "  python -m pytest -q --junitxml=reports/unit.xml"
        # reports: {{junit: "reports/*.xml"}}
        timeout: 10m
  - name: acceptance
    jobs:
      smoke:
        run: echo "run your acceptance tests here"
"""


@cli.command()
@click.option("--force", is_flag=True, help="Overwrite an existing pipeline file.")
@click.option(
    "-f",
    "--file",
    "pipeline_file",
    default="conveyor.yml",
    show_default=True,
    callback=not_empty,
    help="File to write, relative to the repository root.",
)
def init(force: bool, pipeline_file: str) -> None:
    """Write a starter conveyor.yml at the repository root."""
    root = repo_root(required=False) or Path.cwd()
    if not pipeline_file.strip():
        raise UsageError("-f needs a file name", hint="e.g. -f ci/conveyor.yml")
    path = Path(pipeline_file) if Path(pipeline_file).is_absolute() else root / pipeline_file
    if repo_root(required=False) is not None and not path.resolve().is_relative_to(root.resolve()):
        raise UsageError(
            f"{path} is outside the repository {root}",
            hint="the pipeline file is versioned with the code: write it inside the repository",
        )
    real, real_root = path.resolve(), root.resolve()
    inside = real.relative_to(real_root).parts if real.is_relative_to(real_root) else ()
    if ".git" in inside:
        raise UsageError(
            f"{path} is inside git's own folder: git does not version it",
            hint="write it in the working tree, e.g. -f ci/conveyor.yml",
        )
    if path.is_dir():
        raise UsageError(f"{path} is a directory", hint=f"pass -f {pipeline_file}/conveyor.yml")
    if path.exists() and not path.is_file():
        raise UsageError(f"{path} is not a regular file", hint="pass -f with a file name")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists", hint="pass --force to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(
            f"the folder {path.parent} does not exist", hint="create it first, or pick another -f"
        )
    try:
        path.write_text(STARTER.format(name=starter_name(root.name)), encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    click.echo(f"wrote {path}")
    option = "" if pipeline_file == "conveyor.yml" else f" -f {pipeline_file}"
    click.echo(f"next: `conveyor validate{option}`, commit it, then `conveyor run{option}`")


_YAML_WORDS = frozenset({"true", "false", "null", "yes", "no", "on", "off", "y", "n"})


def starter_name(folder: str) -> str:
    """A valid pipeline name made from a folder's name (ASCII letters, digits, ``-_.``; at most
    64 characters; never a YAML keyword nor a number), ``app`` if nothing is left."""
    name = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "-" for c in folder)
    name = "-".join(part for part in name.split("-") if part).strip("-._")[:64].rstrip("-._")
    if not name or name.lower() in _YAML_WORDS or not name[0].isalnum():
        return "app"
    try:
        float(name)
    except ValueError:
        return name
    return "app-" + name[:60]


def _exit_with_problems_json(exc: SpecError) -> NoReturn:
    """Print a ``SpecError``'s problems as the JSON document of ``validate --json``; exit 2."""
    echo_json(
        {
            "valid": False,
            "problems": [
                {
                    "file": p.source,
                    "line": p.line,
                    "column": p.column,
                    "message": p.message,
                    "hint": p.hint,
                }
                for p in exc.problems
            ],
            "count": exc.count,
            "omitted": exc.omitted,
            "complete": exc.complete,
        }
    )
    sys.exit(EXIT_USAGE)


@cli.command()
@file_option
@json_option
def validate(pipeline_file: str, as_json: bool) -> None:
    """Check the pipeline file and explain every problem (exit 2 if there is any)."""
    from conveyor.spec import load_pipeline_file

    path = Path(pipeline_file)
    if not path.is_absolute() and not path.exists():
        root = repo_root(required=False)
        if root is not None and (root / path).exists():
            path = root / path
    try:
        spec = load_pipeline_file(path, pipeline_file)
    except SpecError as exc:
        if as_json:
            _exit_with_problems_json(exc)
        raise
    jobs = sum(len(s.jobs) for s in spec.stages)
    if as_json:
        echo_json(
            {
                "valid": True,
                "pipeline": spec.name,
                "stages": len(spec.stages),
                "jobs": jobs,
                "digest": spec.digest,
            }
        )
    else:
        stages = len(spec.stages)
        click.echo(
            f"{pipeline_file}: ok: pipeline '{spec.name}',"
            f" {stages} stage{'s' if stages != 1 else ''}, {jobs} job{'s' if jobs != 1 else ''}"
        )


@cli.command()
@file_option
@home_option
@click.option(
    "--revision", "-r", callback=not_empty, help="Commit, branch or tag to plan [default: HEAD]."
)
@click.option(
    "--dirty", is_flag=True, help="Plan the working tree as it is, uncommitted changes included."
)
@click.option("--stage", "stages", multiple=True, help="Only this stage (repeatable).")
@click.option("--no-cache", is_flag=True, help="Plan as if the cache were empty.")
@json_option
def plan(
    pipeline_file: str,
    home: Path | None,
    revision: str | None,
    dirty: bool,
    stages: tuple[str, ...],
    no_cache: bool,
    as_json: bool,
) -> None:
    """Show what a run would do, in which order and why (DAG levels, cache hits)."""
    from conveyor.engine.explain import build_plan
    from conveyor.engine.planning import cache_keys

    try:
        root, home_obj, spec, _, snapshot, _ = _load_for_run(pipeline_file, revision, dirty, home)
    except SpecError as exc:
        if as_json:
            _exit_with_problems_json(exc)
        raise
    selected = _check_stages(spec, stages)
    record = open_record_at(home_obj.root, root)
    secrets, _ = _secrets(spec)
    keys = cache_keys(spec, snapshot, secrets)
    the_plan = build_plan(
        spec,
        snapshot,
        keys,
        selected=selected,
        use_cache=not no_cache,
        find_cache=record.find_cache,
    )
    if as_json:
        echo_json(
            {
                "pipeline": the_plan.pipeline,
                "revision": the_plan.revision,
                "dirty": snapshot.dirty,
                "stages": [
                    {
                        "name": s.name,
                        "selected": s.selected,
                        "levels": [
                            [
                                {
                                    "name": j.name,
                                    "needs": list(j.needs),
                                    "action": j.action,
                                    "reason": j.reason,
                                    "cache_key": j.cache_key,
                                    "cached_from": (
                                        {"run": j.cache_hit.run_id, "attempt": j.cache_hit.attempt}
                                        if j.cache_hit
                                        else None
                                    ),
                                }
                                for j in level
                            ]
                            for level in s.levels
                        ],
                        "deploy": (
                            {
                                "environment": s.deploy.environment,
                                "artifact": s.deploy.artifact,
                                "target": s.deploy.target,
                                "requires": list(s.deploy.requires),
                                "branches": list(s.deploy.branches),
                            }
                            if s.deploy
                            else None
                        ),
                    }
                    for s in the_plan.stages
                ],
            }
        )
        return
    click.echo(
        f"pipeline '{the_plan.pipeline}' at {the_plan.revision[:12]}"
        + (" (dirty working tree)" if snapshot.dirty else "")
    )
    for number, stage in enumerate(the_plan.stages, 1):
        note = "" if stage.selected else "  (not selected: skipped)"
        click.echo(f"{number}. stage {stage.name}{note}")
        if stage.deploy is not None:
            d = stage.deploy
            policy = ""
            if d.requires or d.branches:
                policy = (
                    " (accepts "
                    + ", ".join(
                        ([f"builds of {'/'.join(d.branches)}"] if d.branches else [])
                        + ([f"artifacts that passed {', '.join(d.requires)}"] if d.requires else [])
                    )
                    + ")"
                )
            click.echo(
                f"   deploy {d.artifact} to {d.environment} ({d.target} target, recreate,"
                f" automatic rollback){policy}"
            )
        for depth, level in enumerate(stage.levels):
            click.echo(f"   level {depth}:")
            for job in level:
                needs = f" after {', '.join(job.needs)}" if job.needs else ""
                click.echo(f"     {job.action:<6} {job.name}{needs}: {job.reason}")
    click.echo(
        "stages run in order; a failed stage stops the line and the later stages are skipped"
    )


def _check_stages(spec: Any, stages: tuple[str, ...]) -> tuple[str, ...] | None:
    if not stages:
        return None
    known = [s.name for s in spec.stages]
    for name in stages:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=1)
            raise UsageError(
                f"there is no stage '{name}' in pipeline '{spec.name}'",
                hint=(f"did you mean '{close[0]}'? " if close else "")
                + "stages: "
                + ", ".join(known),
            )
    return stages


def _secrets(spec: Any) -> tuple[dict[str, str], list[str]]:
    found = {name: os.environ[name] for name in spec.secrets if os.environ.get(name)}
    missing = [name for name in spec.secrets if name not in found]
    return found, missing


@cli.command()
@file_option
@home_option
@click.option(
    "--jobs",
    "-j",
    "max_jobs",
    type=click.IntRange(1, 1024),
    default=None,
    help="Jobs to run at once [default: the number of CPUs].",
)
@click.option(
    "--stage",
    "stages",
    multiple=True,
    help="Run only this stage (repeatable); the others are recorded skipped.",
)
@click.option("--no-cache", is_flag=True, help="Run every job, even when its cache key matches.")
@click.option(
    "--fail-fast", is_flag=True, help="Cancel the running jobs of a stage as soon as one fails."
)
@click.option(
    "--revision", "-r", callback=not_empty, help="Commit, branch or tag to run [default: HEAD]."
)
@click.option(
    "--dirty", is_flag=True, help="Run the working tree as it is, uncommitted changes included."
)
@click.option(
    "--as",
    "as_user",
    callback=not_empty,
    help="Who starts the run [default: $CONVEYOR_USER, else git user.email, else $USER].",
)
@click.option(
    "--progress",
    type=click.Choice(["auto", "live", "plain", "quiet"]),
    default="auto",
    show_default=True,
    help="Live view on a terminal, plain lines otherwise.",
)
def run(
    pipeline_file: str,
    home: Path | None,
    max_jobs: int | None,
    stages: tuple[str, ...],
    no_cache: bool,
    fail_fast: bool,
    revision: str | None,
    dirty: bool,
    as_user: str | None,
    progress: str,
) -> None:
    """Run the pipeline on the committed revision (exit 1 if it fails, 130 if cancelled)."""
    # First: the checkout starts in the background while the rest of Conveyor loads.
    root, home_obj, spec, source, snapshot, workspace = _load_for_run(
        pipeline_file, revision, dirty, home, checkout=True
    )
    actor = _actor_lookup(as_user, root)  # git answers while the record opens
    try:
        from conveyor.bootstrap import cancellation, prepare_run, prune_workspaces
        from conveyor.engine.engine import RunOptions
        from conveyor.executors.local import LocalExecutor

        selected = _check_stages(spec, stages)
        record = open_record_at(home_obj.root, root)
        secrets, missing = _secrets(spec)
        for name in missing:
            click.echo(
                f"warning: secret {name} is declared but not set in the environment;"
                " jobs will not get it",
                err=True,
            )
        for name, value in secrets.items():
            if len(value) < 4:
                click.echo(
                    f"warning: secret {name} is shorter than 4 characters; masking it will"
                    " also hide ordinary text",
                    err=True,
                )
        options = RunOptions(
            max_parallel=max_jobs or os.cpu_count() or 2,
            stages=selected,
            use_cache=not no_cache,
            fail_fast=fail_fast,
        )
        mode = progress
        if mode == "auto":
            mode = "live" if sys.stdout.isatty() else "plain"
        observer: Any
        if mode == "live":
            from conveyor.cli.progress import LiveProgress

            observer = LiveProgress()
        elif mode == "plain":
            from conveyor.cli.progress import PlainProgress

            observer = PlainProgress()
        else:
            from conveyor.cli.progress import QuietProgress

            observer = QuietProgress()
        executor = LocalExecutor(services=lambda: _recorded_services(home_obj))
        status = "failed"
        with cancellation(executor) as cancel:
            prepared = prepare_run(
                home=home_obj,
                record=record,
                source=source,
                spec=spec,
                snapshot=snapshot,
                options=options,
                actor=actor(),
                secrets=secrets,
                observer=observer,
                cancel=cancel,
                executor=executor,
                workspace=workspace,
                branch=source.branch_of(revision or "HEAD") if spec.environments else "",
            )
            try:
                status = prepared.engine.run(prepared.request)
            finally:
                observer.close()
                prepared.workspace.close()
                prepared.lock.release()
            if status == "succeeded" and cancel.is_set():
                click.echo(
                    "a cancel (Ctrl-C or SIGTERM) came but changed nothing: the run stands as"
                    " recorded (succeeded)",
                    err=True,
                )
        run_id = prepared.request.run_id
        prune_workspaces(home_obj)
        _summary(record, run_id, status)
        # The next command does not have to read this run's log back.
        after_report(record.fold_log)
        sys.exit({"succeeded": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(status, EXIT_FAILED))
    finally:
        if workspace is not None:
            workspace.close()


def _recorded_services(home_obj: Any) -> set[int]:
    from conveyor.adapters.targets.process import recorded_services

    return recorded_services(home_obj.environments)


SUMMARY_FAILURES = 10
"""Failed jobs named one per line after a run; the others are counted."""


def _summary(record: Any, run_id: int, status: str) -> None:
    duration = record.run_duration(run_id)
    click.echo(f"run {run_id} {status}" + (f" in {duration:.2f}s" if duration is not None else ""))
    run_doc = record.get_run(run_id) if status != "succeeded" else None
    if run_doc:
        failed = [
            job
            for stage in run_doc["stages"]
            for job in stage["jobs"]
            if job["status"] in ("failed", "timed_out")
        ]
        for job in failed[:SUMMARY_FAILURES]:
            click.echo(
                f"  {job['name']} {job['status']}: see `conveyor logs {run_id} {job['name']}`"
            )
        more = len(failed) - SUMMARY_FAILURES
        if more > 0:
            click.echo(
                f"  and {more} more failed job{'s' if more > 1 else ''}:"
                f" `conveyor runs show {run_id}` lists them all"
            )


@cli.group()
def runs() -> None:
    """List runs and show what happened in one."""


@runs.command("list")
@home_option
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, 100000),
    default=20,
    show_default=True,
    help="How many runs to list (the newest).",
)
@json_option
def runs_list(home: Path | None, limit: int, as_json: bool) -> None:
    """The latest runs, newest first."""
    record = open_record_at(home)
    items = record.list_runs(limit)
    if as_json:
        echo_json(items)
        return
    if not items:
        click.echo("no runs yet: start one with `conveyor run`")
        return
    from conveyor.domain.text import inline

    click.echo(
        f"{'RUN':>5}  {'STATUS':<11} {'PIPELINE':<16} {'REVISION':<12} {'STARTED':<20} DURATION"
    )
    for item in items:
        started = inline(item["started_at"] or "")[:19].replace("T", " ")
        duration = f"{item['duration_s']:.2f}s" if item["duration_s"] is not None else "-"
        click.echo(
            f"{item['id']:>5}  {inline(item['status']):<11} {inline(item['pipeline'])[:16]:<16}"
            f" {inline(item['revision'])[:12]:<12} {started:<20} {duration}"
        )


@runs.command("show")
@click.argument("run_ref", metavar="RUN")
@home_option
@json_option
@click.option("--events", is_flag=True, help="Also list the run's recorded events.")
def runs_show(run_ref: str, home: Path | None, as_json: bool, events: bool) -> None:
    """One run: its stages, jobs, attempts and test counts (RUN is an id or `latest`)."""
    record = open_record_at(home)
    run_id = run_id_of(record, run_ref)
    doc = record.get_run(run_id)
    verdicts = list(reversed(record.verdicts(run_id=run_id, limit=1000)))
    for stage in doc["stages"]:
        stage["gates"] = [_verdict_doc(v) for v in verdicts if v["stage"] == stage["name"]]
        for job in stage["jobs"]:
            job["attempt_details"] = record.attempts(run_id, job["name"])
    doc["environment_gates"] = [_verdict_doc(v) for v in verdicts if v["environment"]]
    if events:
        doc["events"] = record.events_of_run(run_id)
    if as_json:
        echo_json(doc)
        return
    from conveyor.domain.text import inline  # text a user or a job chose: no escapes

    click.echo(
        f"run {doc['id']}: {inline(doc['status'])}"
        + (f" ({inline(doc['reason'])})" if doc["reason"] else "")
    )
    click.echo(
        f"  pipeline  {inline(doc['pipeline'])} ({inline(doc['pipeline_file'])},"
        f" {inline(doc['pipeline_digest'])[:19]})"
    )
    click.echo(
        f"  revision  {inline(doc['revision'])}"
        + ("  (dirty working tree)" if doc["dirty"] else "")
    )
    click.echo(f"  by        {inline(doc['actor'])}")
    click.echo(f"  started   {inline(doc['started_at'])}")
    click.echo(
        f"  finished  {inline(doc['finished_at'] or '-')}"
        + (f"  ({doc['duration_s']:.2f}s)" if doc["duration_s"] is not None else "")
    )
    for stage in doc["stages"]:
        click.echo(
            f"  stage {inline(stage['name'])}: {inline(stage['status'])}"
            + (f" ({inline(stage['reason'])})" if stage.get("reason") else "")
        )
        for job in stage["jobs"]:
            parts = [f"    {inline(job['name']):<20} {inline(job['status']):<10}"]
            if job["duration_s"] is not None:
                parts.append(f"{job['duration_s']:.2f}s")
            if job["attempts"] and job["attempts"] > 1:
                parts.append(f"{job['attempts']} attempts")
            if job["exit_code"] not in (None, 0):
                parts.append(f"exit {job['exit_code']}")
            if job["tests"]:
                t = job["tests"]
                parts.append(
                    f"tests {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                )
            if job["cached_from"]:
                parts.append(f"cached from run {job['cached_from']['run']}")
            if job["reason"]:
                parts.append(inline(job["reason"]))
            click.echo("  ".join(parts))
        for gate in stage["gates"]:
            click.echo(
                f"    gate {inline(gate['gate'])}: {inline(gate['verdict'])}:"
                f" {inline(gate['summary'])}"
            )
    if events:
        for event in doc["events"]:
            click.echo(f"  #{event['seq']} {inline(event['at'])} {inline(event['type'])}")


def _verdict_doc(v: dict[str, Any]) -> dict[str, Any]:
    keys = ("gate", "kind", "verdict", "summary", "evidence", "override", "environment", "at")
    return {k: v[k] for k in keys}


@cli.command()
@click.argument("run_ref", metavar="RUN")
@click.argument("job")
@home_option
@click.option("--attempt", type=click.IntRange(1, None), help="Which attempt [default: the last].")
@click.option("--follow", "-F", is_flag=True, help="Keep printing output until the job ends.")
@click.option("--raw", is_flag=True, help="Print bytes as stored (escape sequences included).")
def logs(
    run_ref: str, job: str, home: Path | None, attempt: int | None, follow: bool, raw: bool
) -> None:
    """Print the log of a job of a run (RUN is an id or `latest`)."""
    import time

    from conveyor.domain.states import JOB_FINAL

    record = open_record_at(home)
    run_id = run_id_of(record, run_ref)
    doc = record.get_run(run_id)
    names = [j["name"] for s in doc["stages"] for j in s["jobs"]]
    if job not in names:
        import difflib

        close = difflib.get_close_matches(job, names, n=1)
        listing = (
            "jobs: " + ", ".join(names)
            if 0 < len(names) <= 20
            else f"`conveyor runs show {run_id}` lists its {len(names)} jobs"
            if names
            else f"run {run_id} recorded no job"
        )
        raise UsageError(
            f"run {run_id} has no job '{job}'",
            hint=(f"did you mean '{close[0]}'? " if close else "") + listing,
        )
    root = record.path.parent
    watch = _OwnerWatch(record, run_id)

    def current() -> dict[str, Any] | None:
        tries = record.attempts(run_id, job)
        if attempt is not None:
            return next((a for a in tries if a["attempt"] == attempt), None)
        return tries[-1] if tries else None

    chosen = current()
    while chosen is None and follow and record.job_status(run_id, job) not in JOB_FINAL:
        time.sleep(0.2)
        watch.check()
        chosen = current()
    if chosen is None:
        if follow:
            watch.check(final=True)
        had = len(record.attempts(run_id, job))
        if attempt is not None and had:
            raise UsageError(
                f"job '{job}' of run {run_id} has no attempt {attempt}: it had {had}",
                hint=f"`conveyor logs {run_id} {job} --attempt {had}` shows its last one",
            )
        status = record.job_status(run_id, job)
        source = next(
            (j["cached_from"] for st in doc["stages"] for j in st["jobs"] if j["name"] == job),
            None,
        )
        if status == "cached" and source:
            if attempt is not None and attempt != 1:
                raise UsageError(
                    f"job '{job}' of run {run_id} was taken from the cache: it has no attempt"
                    f" {attempt}",
                    hint=f"`conveyor logs {run_id} {job}` shows the log of the attempt it reused",
                )
            click.echo(
                f"(job '{job}' of run {run_id} was taken from the cache: this is the log of"
                f" run {source['run']}, job '{source['job']}', attempt {source['attempt']})",
                err=True,
            )
            _print_log(
                record, root, source["run"], source["job"], source["attempt"], follow=False, raw=raw
            )
            return
        raise UsageError(
            f"job '{job}' of run {run_id} has no log: it is {status}"
            + (" (it did not run)" if status == "skipped" else ""),
            hint=f"`conveyor logs {run_id} {job} --follow` waits for it and follows its output"
            if status == "pending"
            else None,
        )
    number = int(chosen["attempt"])
    while True:
        _print_log(record, root, run_id, job, number, follow=follow, raw=raw, watch=watch)
        if not follow or attempt is not None:
            if follow:
                watch.check(final=True)
            return
        # --follow without --attempt: go on with the retry, if there is one.
        while True:
            newer = [a for a in record.attempts(run_id, job) if a["attempt"] > number]
            if newer:
                number = int(newer[0]["attempt"])
                click.echo(f"--- attempt {number} ---")
                break
            if record.job_status(run_id, job) in JOB_FINAL:
                watch.check(final=True)
                return
            time.sleep(0.2)
            watch.check()


class _OwnerWatch:
    """While ``logs --follow`` waits: notices that the ``conveyor run`` executing the run is
    gone (killed: nobody holds the run's lock any more), has crash recovery record the run
    ``interrupted`` (which ends the wait) and then stops the command with a clear message."""

    def __init__(self, record: Any, run_id: int) -> None:
        self.record = record
        self.run_id = run_id
        self.was_running = self._status() == "running"
        self._next = 0.0

    def _status(self) -> str | None:
        facts = self.record.run_facts(self.run_id)
        return facts["status"] if facts else None

    def check(self, *, final: bool = False) -> None:
        """Look about once a second; with ``final`` (the follow ended), say why if it was this."""
        import time

        if final:
            if self.was_running and self._status() == "interrupted":
                facts = self.record.get_run(self.run_id) or {}
                raise ConveyorError(
                    f"run {self.run_id} was interrupted while its log was followed: "
                    + (facts.get("reason") or "its conveyor process stopped"),
                    hint=f"`conveyor runs show {self.run_id}` shows what it recorded",
                )
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 1.0
        from conveyor.adapters.home import Home
        from conveyor.bootstrap import recover_orphans

        recover_orphans(self.record, Home(self.record.path.parent))


def _print_log(
    record: Any,
    root: Path,
    run_id: int,
    job: str,
    number: int,
    *,
    follow: bool,
    raw: bool,
    watch: _OwnerWatch | None = None,
) -> None:
    """Print one attempt's log; with ``follow``, until the attempt has ended."""
    import time

    from conveyor.domain.text import neutralise

    def row() -> dict[str, Any]:
        return next(a for a in record.attempts(run_id, job) if a["attempt"] == number)

    path = _log_path(root, row()["log"])
    out = sys.stdout.buffer
    tail = b""
    position = 0
    while True:
        data = _read_log(path, position)
        if data is not None:
            position += len(data)
            if data and raw:
                out.write(data)
            elif data:
                data = tail + data
                cut = data.rfind(b"\n") + 1 if follow else len(data)
                chunk, tail = data[:cut], data[cut:]
                out.write(neutralise(chunk.decode("utf-8", "replace")).encode())
            out.flush()
        if not follow:
            break
        current = row()
        if current["status"] != "running" and position >= (current["log_bytes"] or 0):
            break
        if current["status"] != "running" and _read_log(path, position) in (None, b""):
            break  # ended, and its log holds less than recorded: said below
        time.sleep(0.2)
        if watch is not None:
            watch.check()
    if tail:
        out.write(neutralise(tail.decode("utf-8", "replace")).encode())
        out.flush()
    recorded = row()
    if recorded["status"] != "running" and position < (recorded["log_bytes"] or 0):
        raise ConveyorError(
            f"the log of attempt {number} of job '{job}' holds {position} of the"
            f" {recorded['log_bytes']} bytes recorded: {path} was "
            + ("deleted" if not path.exists() else "cut short")
            + " outside Conveyor",
            hint="restore the home's logs folder from a backup",
        )


def _log_path(root: Path, relative: str) -> Path:
    """Where a recorded log lives; only inside the home's ``logs`` folder."""
    import posixpath

    clean = posixpath.normpath(relative)
    if posixpath.isabs(clean) or not clean.startswith("logs/") or ".." in clean.split("/"):
        raise ConveyorError(
            f"the record names a log outside its logs folder ({relative!r}): it was altered",
            hint="`conveyor audit verify` checks the record",
        )
    path = root / clean
    # The logs folder itself may be a link (to a larger disk), not a folder inside it.
    folder, logs = os.path.realpath(path.parent), os.path.realpath(root / "logs")
    if os.path.commonpath([folder, logs]) != logs:
        raise ConveyorError(
            f"cannot read the log {path}: its folder is a link to {folder}",
            hint="a log is a regular file Conveyor wrote; restore the logs folder",
        )
    return path


def _read_log(path: Path, position: int) -> bytes | None:
    """The log's bytes from ``position``; ``None`` if there is no file (yet). A link or
    anything but a regular file is refused."""
    import errno
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConveyorError(
            f"cannot read the log {path}: "
            + ("it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)),
            hint="a log is a regular file Conveyor wrote; restore the logs folder",
        ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConveyorError(
            f"cannot read the log {path}: it is not a regular file",
            hint="a log is a regular file Conveyor wrote; restore the logs folder",
        )
    with open(fd, "rb") as handle:
        handle.seek(position)
        return handle.read()


@cli.group()
def audit() -> None:
    """Check the tamper-evident record."""


@audit.command("verify")
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(readable=False, path_type=Path),  # each is read, or said unreadable, below
    help="Also check that the log holds the event this checkpoint vouches for (repeatable).",
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(readable=False, path_type=Path),
    help="The public key (PEM) that signed the checkpoints [default: this instance's].",
)
@home_option
@json_option
def audit_verify(
    checkpoints: tuple[Path, ...], key_file: Path | None, home: Path | None, as_json: bool
) -> None:
    """Verify the hash chain of the event log (exit 1 naming the first bad event), and the
    checkpoints given (exit 1 if the log no longer holds what one vouches for)."""
    from conveyor.app.checkpoints import ALTERED, INVALID, UNREADABLE
    from conveyor.domain.text import inline
    from conveyor.errors import AuditError, StoreError

    if key_file is not None and not checkpoints:
        raise UsageError("--key is the key of checkpoints", hint="give them with --checkpoint FILE")
    public_pem = _public_key(key_file) if key_file is not None else None
    # As found: recovering an orphaned run first would write a new head mark over a missing one.
    record = open_record_at(home, recover=False)
    key_problem = ""
    try:
        report = record.verify()
        if checkpoints and public_pem is None:
            public_pem, key_problem = _instance_public_key(home)
        checks = [
            _check_checkpoint(record, report, path, public_pem, key_problem) for path in checkpoints
        ]
        shipped = _last_shipped(record, report.events, report.ok)
        unheld = _unheld_verified_mark(record)
    except StoreError as exc:
        if not (exc.hint and "audit verify" in exc.hint):
            raise
        raise StoreError(  # its hint would send the user back here
            exc.message, hint="restore the database (and its -wal file) from a backup"
        ) from exc
    found = {
        kind: [c for c in checks if c.found == kind] for kind in (ALTERED, INVALID, UNREADABLE)
    }
    ok = report.ok and not any(found.values())
    code = EXIT_OK if ok else EXIT_FAILED
    if report.ok and not found[ALTERED] and not found[INVALID] and found[UNREADABLE]:
        code = EXIT_USAGE  # only files that could not be read: not a verdict on the record
    marks = unheld or (_unheld_shipped_text(record, shipped) if shipped is not None else "")
    if marks:
        ok, code = False, EXIT_FAILED  # the home's own marks say the record went back
    if as_json:
        echo_json(
            {
                "ok": ok,
                "events": report.events,
                "first_bad_seq": report.first_bad_seq,
                "problem": report.problem or None,
                "head_hash": report.head_hash,
                "checkpoints": [check.to_dict() for check in checks],
                "last_shipped": shipped,
                "marks_problem": marks or None,
            }
        )
        sys.exit(code)
    for check in checks:
        if check.ok:
            click.echo(
                f"ok: {check.source} (event {check.seq}, signed {inline(check.signed_at or '')})"
            )
        else:
            click.echo(f"FAIL: {inline(check.source)}: {inline(check.problem)}", err=True)
    if not report.ok:
        raise AuditError(
            f"the event log does not verify: {report.problem}",
            hint=(
                f"first bad event: #{report.first_bad_seq}; "
                if report.first_bad_seq is not None
                else ""
            )
            + "the record was altered outside Conveyor",
        )
    if marks:  # before the checkpoints' findings: an unreadable one must not hide it
        raise AuditError(
            marks,
            hint="`conveyor audit verify --checkpoint FILE` with the checkpoints shipped tells"
            " what changed; if the record was restored from a backup on purpose, delete"
            f" {record.path.name}.verified and {record.path.name}.shipped",
        )
    if found[ALTERED]:
        raise AuditError(
            f"{len(found[ALTERED])} of {len(checks)} checkpoints no longer hold: the record was"
            " altered since they were made, or they are another record's",
            hint="if they are this record's, restore the database (and its -wal file) from a"
            " backup made before",
        )
    if found[INVALID]:
        raise AuditError(
            f"{len(found[INVALID])} of {len(checks)} checkpoints could not be checked: they are"
            " not checkpoints signed by the key (see above)",
            hint="check the files, and give the key that signed them with --key FILE",
        )
    if found[UNREADABLE]:
        raise UsageError(f"{len(found[UNREADABLE])} of {len(checks)} checkpoints cannot be read")
    click.echo(f"ok: {report.events} events, hash chain intact (head {report.head_hash[:16]})")
    if shipped is not None:
        click.echo(
            f"last checkpoint shipped: event {shipped['seq']}"
            f" ({shipped['shipped_at'] or 'time unknown'}),"
            f" {shipped['events_since']} events since"
        )


def _unheld_verified_mark(record: Any) -> str:
    """What is wrong with ``conveyor.db.verified`` (the event the log was last verified up to
    before a checkpoint was signed), if the log no longer holds that event: ``""`` if it does,
    or there is no such mark."""
    from conveyor.store.sqlite import VERIFIED, read_mark

    mark = read_mark(record.path, VERIFIED)
    if mark is None or record.event_hash_at(mark["seq"]) == mark["hash"]:
        return ""
    return (
        f"the record no longer holds event {mark['seq']} as it was verified up to before a"
        f" checkpoint was signed ({record.path.name}.verified): it was rolled back to an older"
        " copy, or rewritten, since"
    )


def _unheld_shipped_text(record: Any, shipped: dict[str, Any]) -> str:
    if shipped["held"]:
        return ""
    return (
        f"the record no longer holds event {shipped['seq']} as the last checkpoint shipped"
        f" vouched for it ({record.path.name}.shipped): it was rolled back to an older copy,"
        " or rewritten, since"
    )


def _last_shipped(record: Any, events: int, verified: bool) -> dict[str, Any] | None:
    """What ``conveyor.db.shipped`` says of the last checkpoint shipped (as told by the
    home: the checkpoints themselves are the proof), if anything."""
    from conveyor.domain.text import inline
    from conveyor.store.sqlite import SHIPPED, read_mark

    mark = read_mark(record.path, SHIPPED)
    if mark is None:
        return None
    at = mark.get("shipped_at")
    held = record.event_hash_at(mark["seq"]) == mark["hash"]
    return {
        "seq": mark["seq"],
        "shipped_at": inline(at[:40]) if isinstance(at, str) else None,
        "held": held,
        "events_since": max(0, events - mark["seq"]) if held and verified else None,
    }


_KEY_BYTES = 64 * 1024


def _read_small(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a regular file: never opens anything else (a FIFO would
    block, a device may act), nor reads a huge file whole (files in the home, or given, are
    untrusted)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, "it is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "it is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)


def _public_key(path: Path) -> str:
    """The public key (PEM) in a file the user gave; a usage error if it is not one."""
    from conveyor.adapters.signing import load_public_key

    try:
        data = _read_small(path, _KEY_BYTES)
    except OSError as exc:
        raise UsageError(f"cannot read the public key {path}: {exc.strerror or exc}") from exc
    if len(data) > _KEY_BYTES:
        raise UsageError(f"{path} is not a public key: it is larger than {_KEY_BYTES} bytes")
    try:
        load_public_key(data)
    except ConveyorError as exc:
        raise UsageError(f"{path}: {exc.message}", hint=exc.hint) from exc
    return data.decode("ascii", "replace")


def _instance_public_key(home: Path | None) -> tuple[str | None, str]:
    """This instance's public key, or ``None`` and why not: each checkpoint then says so, for
    a missing or replaced key is itself a finding."""
    from conveyor.adapters.signing import PUBLIC_KEY_FILE

    path = home_of(home, None if home else repo_root()).keys / PUBLIC_KEY_FILE
    try:
        return _public_key(path), ""
    except UsageError as exc:
        return None, exc.message


def _check_checkpoint(
    record: Any, report: Any, path: Path, public_pem: str | None, key_problem: str = ""
) -> Any:
    from conveyor.adapters.signing import PUBLIC_KEY_FILE
    from conveyor.app.checkpoints import (
        INVALID,
        MAX_CHECKPOINT_BYTES,
        UNREADABLE,
        CheckpointCheck,
        check_checkpoint,
    )

    try:
        data = _read_small(path, MAX_CHECKPOINT_BYTES)
    except OSError as exc:
        return CheckpointCheck(
            str(path), UNREADABLE, problem=f"cannot read it: {exc.strerror or exc}"
        )
    if public_pem is None:
        return CheckpointCheck(
            str(path),
            INVALID,
            problem=f"this home's public key (keys/{PUBLIC_KEY_FILE}) is not usable"
            f" ({key_problem}): check it with the key that signed it (--key FILE)",
        )
    return check_checkpoint(record, report, str(path), data, public_pem)


@audit.command("checkpoint")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write it to FILE (keep it off this machine) [default: standard output].",
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.option(
    "--ship",
    is_flag=True,
    help="Hand it to CONVEYOR_CHECKPOINT_COMMAND now, as commands that write do at their end.",
)
@home_option
def audit_checkpoint(output: Path | None, force: bool, ship: bool, home: Path | None) -> None:
    """Sign the event log's newest event: a checkpoint to keep off this machine, which
    `audit verify --checkpoint FILE` later checks the log still holds."""
    import json

    from conveyor.adapters.clock import SystemClock
    from conveyor.adapters.signing import InstanceKey
    from conveyor.app.checkpoints import make_checkpoint

    if force and output is None:
        raise UsageError("--force replaces the file -o writes", hint="give -o FILE with it")
    if ship:
        _ship_now(output, home)
        return
    record = open_record_at(home, recover=False)
    key = InstanceKey.load_or_create(home_of(home, None if home else repo_root()).keys)
    envelope, seq, digest = make_checkpoint(record, key, SystemClock().now())
    text = json.dumps(envelope, indent=2) + "\n"
    if output is None:
        try:
            if sys.stdout is None:
                raise OSError(0, "it is closed")
            sys.stdout.write(text)
            sys.stdout.flush()
        except OSError as exc:
            raise ConveyorError(
                f"cannot write the checkpoint to standard output: {exc.strerror or exc}",
                hint="write it to a file with -o FILE",
            ) from exc
    else:
        _write_file(output, text.encode("ascii"), force)
    click.echo(
        f"checkpoint of event {seq} (hash {digest[:16]}), signed by key {key.keyid[:16]}"
        + (f", written to {output}" if output else ""),
        err=True,
    )


def _ship_now(output: Path | None, home: Path | None) -> None:
    """``audit checkpoint --ship``: exit 1 if the command fails, 2 if none is set."""
    from conveyor.bootstrap import CHECKPOINT_COMMAND, checkpoint_command, ship_checkpoint_of

    if output is not None:
        raise UsageError(
            "--ship hands the checkpoint to CONVEYOR_CHECKPOINT_COMMAND; -o writes it to a file",
            hint="give one of them",
        )
    command = checkpoint_command()
    if command is None:
        raise UsageError(
            f"{CHECKPOINT_COMMAND} is not set: there is nothing to ship the checkpoint with",
            hint=f"set it to a shell command that keeps its standard input off this machine,"
            f" e.g. {CHECKPOINT_COMMAND}='ssh backup \"cat > ckpt/$CONVEYOR_CHECKPOINT_NAME\"'",
        )
    open_record_at(home, recover=False).close()  # created and migrated, as for any command
    home_obj = home_of(home, None if home else repo_root())
    seq, name = ship_checkpoint_of(home_obj, command, full=True, again=True)
    click.echo(f"checkpoint of event {seq} shipped as {name}", err=True)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file, never through a link) holding ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _write_file(path: Path, data: bytes, force: bool = False) -> None:
    """Write ``data`` to a new file at ``path`` (``force``: replace the regular file there),
    durably: readers see no file, or the old one, or the whole new one. A link, or anything but
    a regular file, is refused: the file must be where it is said to be."""
    import tempfile

    try:
        found = path.lstat()
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise ConveyorError(f"cannot write {path}: {exc.strerror or exc}") from exc
    if found is not None:
        if stat.S_ISLNK(found.st_mode) or not stat.S_ISREG(found.st_mode):
            raise UsageError(
                f"{path} is not a regular file", hint="give the path of a file, not of a link"
            )
        if not force:
            raise UsageError(f"{path} exists already", hint="pass --force to replace it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ckpt.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ConveyorError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if a file appeared there meanwhile: none is replaced
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: create it exclusively
                _write_new(path, data)
            os.unlink(tmp)
    except FileExistsError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise UsageError(f"{path} exists already", hint="pass --force to replace it") from exc
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConveyorError(f"cannot write {path}: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):  # the name made durable (a write-only folder: not)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@cli.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--progress",
    type=click.Choice(["auto", "live", "plain"]),
    default="auto",
    show_default=True,
    help="Feedback while the demo's pipeline runs (as for `conveyor run`).",
)
def demo(directory: Path | None, progress: str) -> None:
    """Create a sample repository with a small service and its tests, and run its pipeline."""
    from conveyor.demo import run_demo

    sys.exit(run_demo(directory, progress))


def _fail(exc: ConveyorError) -> NoReturn:
    from conveyor.errors import SpecError

    # Spec problems are already "file:line:col: message" lines, as compilers print them.
    prefix = "" if isinstance(exc, SpecError) else "Error: "
    click.echo(f"{prefix}{exc.render()}", err=True)
    sys.exit(exc.exit_code)


_AFTER_REPORT: list[Callable[[], object]] | None = None
"""Housekeeping a resident worker does once its client has the exit code (``None``: none
put off; a process of its own does it at once, before it ends)."""


def after_report(task: Callable[[], object]) -> None:
    """Do ``task`` (housekeeping that changes nothing the caller sees) now or, in a resident
    worker, once the caller has been told the exit code: the caller does not wait for it."""
    if _AFTER_REPORT is None:
        task()
    else:
        _AFTER_REPORT.append(task)


def entry(before_exit: Callable[[int], object] | None = None) -> NoReturn:
    """Console entry point: ``main``, then leave without the interpreter's teardown.

    Every file and the record are closed by then; tearing down thousands of objects and
    modules only delays the exit (about 10 ms, a fifth of a small run's own overhead).
    ``before_exit`` gets the exit code once everything is written (a resident Conveyor's
    worker tells its client there, before its own exit); the housekeeping put off with
    ``after_report`` follows it.
    """
    global _AFTER_REPORT
    if before_exit is not None:
        _AFTER_REPORT = []
    try:
        main()
        code: int = EXIT_OK
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or EXIT_OK
        else:
            print(exc.code, file=sys.stderr)
            code = EXIT_FAILED
    except KeyboardInterrupt:  # a second signal while the first one's message was written
        code = EXIT_CANCELLED
    # Over: a signal now ends it at once (it would only turn the exit into a traceback),
    # but while a checkpoint is shipped (it cancels that).
    signal.signal(signal.SIGINT, _exit_cancelled)
    signal.signal(signal.SIGTERM, _exit_cancelled)
    code = _ship_checkpoints(code)
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with it closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or EXIT_FAILED
    if before_exit is not None:
        with contextlib.suppress(Exception):
            before_exit(code)
        for task in _AFTER_REPORT or ():
            with contextlib.suppress(Exception):
                task()
    os._exit(code)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _exit_cancelled(signum: int, frame: object) -> None:
    os._exit(EXIT_CANCELLED)


def _ship_checkpoints(code: int) -> int:
    """After a command that wrote to a record, with ``CONVEYOR_CHECKPOINT_COMMAND`` set: a
    checkpoint shipped off the machine. A failure is a warning; the command's exit code
    stands (130 if the shipping is cancelled)."""
    if not os.environ.get("CONVEYOR_CHECKPOINT_COMMAND", "").strip():
        return code
    bootstrap = sys.modules.get("conveyor.bootstrap")
    if bootstrap is None:  # no record was opened
        return code
    if code == EXIT_CANCELLED:  # whoever cancelled wants it to end now
        if bootstrap.wrote_records():
            with contextlib.suppress(OSError, ValueError):
                click.echo(
                    "note: no checkpoint shipped (the command was cancelled): the next command"
                    " that writes to the record ships one",
                    err=True,
                )
        return code
    problem = ""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)
        bootstrap.ship_checkpoints(lambda text: click.echo(text, err=True))
    except KeyboardInterrupt:
        problem = "cancelled (Ctrl-C or SIGTERM)"
        code = code or EXIT_CANCELLED
    except Exception as exc:  # the command is over: never a traceback after its outcome
        problem = str(exc)
    finally:
        signal.signal(signal.SIGINT, _exit_cancelled)
        signal.signal(signal.SIGTERM, _exit_cancelled)
    if problem:
        with contextlib.suppress(OSError, ValueError):  # stderr closed or full
            click.echo(f"warning: the checkpoint was not shipped: {problem}", err=True)
    return code


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and turn every error into a message and an exit code."""
    # Ctrl-C and SIGTERM cancel the command (exit 130); `run` installs its own handlers.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    # Inherited as ignored (some launchers do), children would be reaped unseen: exit
    # statuses lost (a job's, a shipping command's).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        cli.main(args=argv, prog_name="conveyor", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("cancelled", err=True)
        sys.exit(EXIT_CANCELLED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE if exc.exit_code == 2 else exc.exit_code)
    except ConveyorError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo("cancelled", err=True)
        sys.exit(EXIT_CANCELLED)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(EXIT_FAILED)
    except Exception as exc:  # the user never sees a traceback
        if os.environ.get("CONVEYOR_DEBUG"):
            raise
        click.echo(
            f"Error: internal error: {type(exc).__name__}: {exc}\n"
            "  hint: this is a bug in Conveyor; rerun with CONVEYOR_DEBUG=1 for details"
            " and report it",
            err=True,
        )
        sys.exit(EXIT_FAILED)
