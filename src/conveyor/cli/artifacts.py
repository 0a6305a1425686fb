"""``conveyor artifacts …``, ``conveyor keys show`` and ``conveyor verify``."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

import click

from conveyor.cli.common import (
    EXIT_FAILED,
    echo_json,
    file_option,
    home_of,
    home_option,
    json_option,
    open_record_at,
    repo_root,
    run_id_of,
)
from conveyor.errors import ConveyorError, UsageError

REF_HELP = "ARTIFACT is NAME@RUN (RUN an id or `latest`), NAME (its latest run) or sha256:<hex>."


def _home(home: Path | None) -> Any:
    return home_of(home, None if home is not None else repo_root())


def _store(home: Path | None) -> Any:
    from conveyor.adapters.artifacts import FileArtifactStore

    return FileArtifactStore(_home(home).artifacts)


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


@click.group()
def artifacts() -> None:
    """List, show, fetch and explain the artifacts the pipeline built."""


@artifacts.command("list")
@home_option
@click.option("--run", "run_ref", metavar="RUN", help="Only this run's artifacts (id or latest).")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, 100000),
    default=50,
    show_default=True,
    help="At most this many, newest first.",
)
@json_option
def artifacts_list(home: Path | None, run_ref: str | None, limit: int, as_json: bool) -> None:
    """Published artifacts, newest run first."""
    record = open_record_at(home)
    run_id = run_id_of(record, run_ref) if run_ref else None
    items = record.list_artifacts(run_id, limit)
    if as_json:
        echo_json(items)
        return
    if not items:
        click.echo(
            "no artifacts yet: declare some under 'artifacts:' and list them in a job's 'outputs'"
        )
        return
    click.echo(f"{'RUN':>5}  {'NAME':<20} {'KIND':<5} {'SIZE':>10}  {'JOB':<16} DIGEST")
    for item in items:
        reused = (
            ""
            if item["built_by_run"] == item["run"]
            else f"  (built by run {item['built_by_run']})"
        )
        click.echo(
            f"{item['run']:>5}  {item['name'][:20]:<20} {item['kind']:<5} {_size(item['size']):>10}"
            f"  {item['job'][:16]:<16} {item['digest'][:19]}{reused}"
        )


@artifacts.command("show", epilog=REF_HELP)
@click.argument("ref", metavar="ARTIFACT")
@home_option
@json_option
def artifacts_show(ref: str, home: Path | None, as_json: bool) -> None:
    """One artifact: digest, size, the job and revision that built it, where it went."""
    from conveyor.app.artifacts import decode_statement, provenance_summary, resolve

    record = open_record_at(home)
    item = resolve(record, ref)
    statement = decode_statement(item.provenance)
    summary = provenance_summary(statement) if statement else {}
    doc = {
        "name": item.name,
        "kind": item.kind,
        "digest": item.digest,
        "size": item.size,
        "path": item.path,
        "run": item.run_id,
        "job": item.job,
        "runs": record.artifact_runs(item.digest),
        "provenance": summary,
    }
    if as_json:
        echo_json(doc)
        return
    click.echo(f"{item.name}@{item.run_id}: {item.digest}")
    click.echo(f"  kind      {item.kind} ({item.path}), {_size(item.size)}")
    click.echo(f"  job       {item.job} of run {item.run_id}")
    if summary:
        click.echo(f"  built by  run {summary.get('run')} at revision {summary.get('revision')}")
        click.echo(f"  from      {summary.get('repository')}")
        click.echo(f"  builder   {summary.get('builder')}")
        for dep in summary.get("inputs", []):
            click.echo(
                f"  input     {dep.get('name')} sha256:{dep.get('digest', {}).get('sha256')}"
            )
    click.echo(f"  in runs   {', '.join(str(r) for r in doc['runs'])}")


@artifacts.command("get", epilog=REF_HELP)
@click.argument("ref", metavar="ARTIFACT")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write it: a new file (or one in an existing directory), or for a directory"
    " artifact a new (or empty) directory.",
)
@click.option("--force", is_flag=True, help="Replace an existing file.")
@home_option
def artifacts_get(ref: str, output: Path, home: Path | None, force: bool) -> None:
    """Write an artifact's bytes, verified against its digest."""
    from conveyor.app.artifacts import resolve

    record = open_record_at(home)
    item = resolve(record, ref)
    if item.kind == "file" and output.is_dir():
        output = output / item.path.rsplit("/", 1)[-1]
    if item.kind == "file" and (output.exists() or output.is_symlink()):
        if not force:
            raise UsageError(f"{output} exists already", hint="pass --force to replace it")
        mode = output.lstat().st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise UsageError(
                f"{output} is not a regular file: --force replaces files, not devices, pipes"
                " or sockets",
                hint="pick another -o",
            )
    if not output.parent.is_dir():
        raise UsageError(
            f"the folder {output.parent} does not exist", hint="create it first, or pick another -o"
        )
    _store(home).export(item.digest, item.kind, str(output))
    click.echo(f"wrote {item.name}@{item.run_id} ({item.digest}) to {output}")


@artifacts.command("provenance", epilog=REF_HELP)
@click.argument("ref", metavar="ARTIFACT")
@home_option
def artifacts_provenance(ref: str, home: Path | None) -> None:
    """Print the signed provenance (a DSSE envelope, JSON) exactly as stored."""
    from conveyor.app.artifacts import resolve

    record = open_record_at(home)
    click.echo(resolve(record, ref).provenance)


@click.group()
def keys() -> None:
    """This instance's signing key."""


@keys.command("show")
@home_option
@json_option
def keys_show(home: Path | None, as_json: bool) -> None:
    """Print the public key (PEM) that verifies this instance's provenance and checkpoints."""
    from conveyor.adapters.signing import InstanceKey

    key = InstanceKey.load_or_create(_home(home).keys)
    if as_json:
        echo_json({"keyid": key.keyid, "builder_id": key.builder_id, "public_key": key.public_pem})
        return
    click.echo(key.public_pem.rstrip("\n"))


@click.command(epilog=REF_HELP)
@click.argument("ref", metavar="ARTIFACT")
@home_option
@click.option(
    "--key",
    "key_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Verify with this public key (PEM) instead of this instance's.",
)
@click.option(
    "--env",
    "environment",
    metavar="ENV",
    help="Also check ENV's policy (branches, required stages) as a promotion would.",
)
@file_option
@json_option
def verify(
    ref: str,
    home: Path | None,
    key_file: Path | None,
    environment: str | None,
    pipeline_file: str,
    as_json: bool,
) -> None:
    """Check that an artifact is what the pipeline built and signed (exit 1 if not)."""
    from conveyor.adapters.signing import InstanceKey
    from conveyor.app.artifacts import resolve
    from conveyor.app.artifacts import verify as verify_artifact
    from conveyor.domain.provenance import builder_id_for

    record = open_record_at(home)
    item = resolve(record, ref)
    if key_file is not None:
        from conveyor.adapters.signing import key_id, load_public_key

        public_pem = key_file.read_text(errors="replace")
        try:
            builder_id = builder_id_for(key_id(load_public_key(public_pem)))
        except ConveyorError as exc:
            raise UsageError(f"{key_file}: {exc.message}", hint=exc.hint) from exc
    else:
        key = InstanceKey.load_or_create(_home(home).keys)
        public_pem, builder_id = key.public_pem, key.builder_id
    result = verify_artifact(item, _store(home), public_pem, builder_id)
    if environment is not None:
        from conveyor.app.artifacts import Check
        from conveyor.app.deploy import policy_problems
        from conveyor.cli.environments import _context, _environment

        _, _, spec, _, _ = _context(pipeline_file, home)
        problems = policy_problems(record, _environment(spec, environment), item)
        result.checks.append(
            Check("policy", False, "; ".join(p for p, _ in problems))
            if problems
            else Check("policy", True, f"environment '{environment}' accepts it")
        )
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"{item.name}@{item.run_id} {item.digest}")
        for check in result.checks:
            click.echo(f"  {'ok  ' if check.ok else 'FAIL'} {check.name:<10} {check.detail}")
        click.echo("verified" if result.ok else "NOT verified: do not deploy it")
    if not result.ok:
        sys.exit(EXIT_FAILED)
