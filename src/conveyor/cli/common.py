"""Helpers shared by the command modules: common options, the home, the record, run refs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from conveyor.errors import UsageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130

F = TypeVar("F", bound=Callable[..., Any])


def _not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """An option given as ``''`` is a mistake (a shell variable that was not set), not a
    request for the default."""
    if isinstance(value, str | Path) and str(value).strip() == "" and value is not None:
        source = ctx.get_parameter_source(param.name or "")
        if source is not click.core.ParameterSource.ENVIRONMENT:
            raise click.BadParameter("must not be empty", ctx=ctx, param=param)
    return value


class _Folder(click.Path):
    """A folder path; ``''`` is refused (it would silently mean the current directory)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty", param, ctx)
        return super().convert(value, param, ctx)


def home_option(func: F) -> F:
    return click.option(
        "--home",
        type=_Folder(file_okay=False, path_type=Path),
        envvar="CONVEYOR_HOME",
        help="State folder [default: .conveyor at the repository root; env CONVEYOR_HOME].",
    )(func)


def file_option(func: F) -> F:
    return click.option(
        "-f",
        "--file",
        "pipeline_file",
        default="conveyor.yml",
        show_default=True,
        callback=_not_empty,
        help="Pipeline file, relative to the current directory, else to the repository root.",
    )(func)


def not_empty(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Click callback: ``--opt ''`` is a usage error (a shell variable that was not set), not
    a request for the default."""
    return _not_empty(ctx, param, value)


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (documented in docs/cli.md)."
    )(func)


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False))


# -- context helpers ------------------------------------------------------------------------


def repo_root(required: bool = True) -> Path | None:
    from conveyor.adapters.git import find_repo_root

    root = find_repo_root(Path.cwd())
    if root is None and required:
        raise UsageError(
            "not inside a git repository",
            hint="run conveyor from a git repository (git init), or cd into one",
        )
    return root


def home_of(home: Path | None, root: Path | None) -> Any:
    from conveyor.adapters.home import Home

    if home is not None:
        return Home(home.resolve())
    if root is None:
        raise UsageError(
            "no home for Conveyor's state",
            hint="run inside a git repository, or pass --home / set CONVEYOR_HOME",
        )
    return Home(root / ".conveyor")


def open_record_at(home: Path | None, root: Path | None = None, *, recover: bool = True) -> Any:
    from conveyor.bootstrap import open_record

    if home is None and root is None:
        root = repo_root()
    return open_record(
        home_of(home, root), recover=recover, say=lambda text: click.echo(text, err=True)
    )


def run_id_of(record: Any, ref: str) -> int:
    run_id = record.resolve_run(ref)
    if run_id is None:
        if ref == "latest":
            raise UsageError("there are no runs yet", hint="start one with `conveyor run`")
        raise UsageError(
            f"there is no run '{ref}'",
            hint="`conveyor runs list` shows the runs; RUN is a run id or `latest`",
        )
    return int(run_id)


def check_environment(record: Any, name: str, root: Path | None) -> None:
    """Refuse an environment that neither the record nor the pipeline file knows (a typo
    would print an empty history, or metrics of nothing rated low)."""
    from conveyor.domain.text import inline

    known = set(record.environment_names())
    if root is not None:
        try:
            from conveyor.spec import load_pipeline_file

            spec = load_pipeline_file(root / "conveyor.yml")
            known.update(e.name for e in spec.environments)
        except Exception:
            pass
    if name in known:
        return
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1)
    raise UsageError(
        f"there is no environment '{inline(name)}'",
        hint=f"did you mean '{close[0]}'?"
        if close
        else ("environments: " + ", ".join(sorted(known)) if known else "none is known yet"),
    )
