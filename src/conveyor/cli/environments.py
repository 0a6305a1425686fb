"""``conveyor promote`` and ``conveyor env list|status|history|logs|stop``."""

from __future__ import annotations

import difflib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from conveyor.cli.common import (
    EXIT_FAILED,
    check_environment,
    echo_json,
    file_option,
    home_option,
    json_option,
    not_empty,
    open_record_at,
    repo_root,
    run_id_of,
)
from conveyor.domain.text import inline
from conveyor.errors import ConveyorError, DeployCancelled, UsageError


def _context(pipeline_file: str, home: Path | None) -> tuple[Path, Any, Any, Any, Any]:
    """Root, home, pipeline spec (at HEAD: today's policy), git source and record."""
    from conveyor.cli.main import _load_for_run

    root, home_obj, spec, source, _, _ = _load_for_run(pipeline_file, None, False, home)
    record = open_record_at(home_obj.root, root)
    return root, home_obj, spec, source, record


def _environment(spec: Any, name: str) -> Any:
    names = [e.name for e in spec.environments]
    if name in names:
        return spec.environment(name)
    close = difflib.get_close_matches(name, names, n=1)
    raise UsageError(
        f"there is no environment '{name}' in {spec.source}",
        hint=f"did you mean '{close[0]}'?"
        if close
        else ("environments: " + ", ".join(names) if names else "declare it under 'environments:'"),
    )


def _artifact_of(record: Any, spec: Any, ref: str, artifact: str | None) -> Any:
    """The artifact a promotion takes: from an artifact reference, or from a run."""
    from conveyor.app.artifacts import resolve

    if not (ref == "latest" or (ref.isascii() and ref.isdigit())):
        if artifact:
            raise UsageError("--artifact goes with a RUN, not with an ARTIFACT reference")
        return resolve(record, ref)
    run_id = run_id_of(record, ref)
    published = {a["name"]: a for a in record.list_artifacts(run_id, 1000)}
    if artifact is None:
        deployed = [s.deploy.artifact for s in spec.stages if s.deploy is not None]
        candidates = [n for n in dict.fromkeys(deployed) if n in published] or list(published)
        if len(candidates) != 1:
            raise UsageError(
                f"run {run_id} published "
                + (f"{len(candidates)} artifacts" if candidates else "no artifacts"),
                hint="name one with --artifact NAME: " + ", ".join(published)
                if published
                else "promote a run whose jobs have outputs",
            )
        artifact = candidates[0]
    return resolve(record, f"{artifact}@{run_id}")


@click.command()
@click.argument("ref", metavar="RUN|ARTIFACT")
@click.option("--to", "environment", required=True, help="The environment to deploy to.")
@click.option("--artifact", "artifact_name", help="Which artifact of RUN (if it has several).")
@click.option(
    "--wait",
    type=click.FloatRange(0, 86400),
    default=600.0,
    show_default=True,
    help="Seconds to wait for a deployment already going on in the environment.",
)
@click.option(
    "--as",
    "as_user",
    callback=not_empty,
    help="Who promotes [default: CONVEYOR_USER or git user.email].",
)
@click.option("--hotfix", is_flag=True, help="Mark the deployment as an unplanned fix.")
@file_option
@home_option
@json_option
def promote(
    ref: str,
    environment: str,
    artifact_name: str | None,
    wait: float,
    as_user: str | None,
    hotfix: bool,
    pipeline_file: str,
    home: Path | None,
    as_json: bool,
) -> None:
    """Deploy an artifact the pipeline already built to an environment (never a rebuild).

    RUN|ARTIFACT is a run (id or `latest`: the artifact its deploy stages use, or its only
    one) or an artifact (NAME@RUN, NAME, sha256:<hex>). Refused, with nothing changed, unless
    it verifies and the environment's policy accepts it. Exit 0 if the deployment succeeded,
    1 if it was refused, failed or rolled back.
    """
    from conveyor.bootstrap import CancelFlag, declared_ports, make_deployer
    from conveyor.cli.main import _actor

    root, home_obj, spec, source, record = _context(pipeline_file, home)
    env = _environment(spec, environment)
    item = _artifact_of(record, spec, ref, artifact_name)
    facts = record.run_facts(item.run_id) or {}
    # From here on Ctrl-C and SIGTERM ask the deployment to stop at its next safe point (an
    # exception at any point could leave a release running untracked, or a write half done).
    cancel = CancelFlag()
    deployer = make_deployer(
        home_obj,
        record,
        source,
        lambda text: click.echo(text, err=as_json),
        wait_s=wait,
        secrets=[os.environ[name] for name in spec.secrets if os.environ.get(name)],
        cancelled=cancel.is_set,
        reserved_ports=declared_ports(spec),
    )
    handlers = {sig: signal.signal(sig, cancel.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcome = deployer.deploy(
            env,
            item,
            revision=facts.get("revision", ""),
            actor=_actor(as_user, root),
            trigger="promote",
            hotfix=hotfix,
        )
    except ConveyorError as exc:
        if as_json and exc.deployment_id is not None:  # it was recorded: print it as promised
            echo_json(record.deployment(exc.deployment_id))
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    if as_json:
        echo_json(record.deployment(outcome.deployment_id))
    if outcome.status == "interrupted" or outcome.cancelled:
        sys.exit(DeployCancelled.exit_code)
    if cancel.is_set():
        click.echo(
            f"deployment {outcome.deployment_id} ended {outcome.status} with nothing left for the"
            " cancel to stop: it stands as recorded",
            err=True,
        )
    if outcome.status != "succeeded":
        sys.exit(EXIT_FAILED)


@click.group()
def env() -> None:
    """Environments: what runs where, since when, and the history of deployments."""


def _status_doc(
    record: Any,
    home_obj: Any,
    source: Any,
    spec_env: Any,
    name: str,
    reserved: frozenset[int] = frozenset(),
) -> dict[str, Any]:
    from conveyor.app.deploy import unfinished_deployments
    from conveyor.bootstrap import make_target
    from conveyor.domain.delivery import Release

    state = record.environment_state(name)
    in_progress, interrupted = unfinished_deployments(record, name)
    doc: dict[str, Any] = {
        "name": name,
        "status": state["status"] if state else "never deployed",
        "since": state["since"] if state else None,
        "deployment": None,
        "artifact": None,
        "digest": None,
        "revision": None,
        "run": None,
        "deployed_by": None,
        "url": None,
        "running": None,
        "gates": _latest_verdicts(record, name),
        "deploying": in_progress[0]["id"] if in_progress else None,
        "interrupted": [{"deployment": row["id"], "run": row["run"]} for row in interrupted],
    }
    if state is None or state["deployment"] is None:
        return doc
    row = record.deployment(state["deployment"])
    doc.update(
        deployment=row["id"],
        artifact=row["artifact"],
        digest=row["digest"],
        revision=row["revision"],
        run=row["run"],
        deployed_by=row["actor"],
    )
    if spec_env is not None and state["status"] in ("running", "unknown"):
        release = Release(
            environment=name,
            deployment_id=row["id"],
            artifact=row["artifact"],
            digest=row["digest"],
            folder=str(home_obj.environments / name / "releases" / str(row["id"])),
            artifact_path="",
            revision=row["revision"],
        )
        try:
            live = make_target(
                home_obj, source, spec_env, release, reserved_ports=reserved
            ).describe(release)
        except Exception:
            live = {}
        doc["running"] = live.get("running")
        doc["url"] = live.get("url")
    return doc


def _latest_verdicts(record: Any, environment: str) -> list[dict[str, Any]]:
    """The latest verdict of each gate of the environment (the last evaluation's digest)."""
    rows = record.verdicts(environment=environment, limit=200)
    if not rows:
        return []
    digest = rows[0]["digest"]
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["digest"] == digest and row["gate"] not in seen:
            seen[row["gate"]] = row
    return list(reversed(list(seen.values())))


@env.command("list")
@file_option
@home_option
@json_option
def env_list(pipeline_file: str, home: Path | None, as_json: bool) -> None:
    """Every environment of the pipeline, with what runs there."""
    _, home_obj, spec, source, record = _context(pipeline_file, home)
    from conveyor.bootstrap import declared_ports

    reserved = declared_ports(spec)
    docs = [_status_doc(record, home_obj, source, e, e.name, reserved) for e in spec.environments]
    if as_json:
        echo_json(docs)
        return
    if not docs:
        click.echo(f"no environments in {spec.source}: declare them under 'environments:'")
        return
    click.echo(
        f"{'ENVIRONMENT':<16} {'STATUS':<15} {'ARTIFACT':<12} {'DIGEST':<20} {'RUN':>4}  URL"
    )
    for doc in docs:
        status = "interrupted" if doc["interrupted"] else doc["status"]
        click.echo(
            f"{doc['name'][:16]:<16} {status:<15} {(doc['artifact'] or '-')[:12]:<12}"
            f" {(doc['digest'] or '-')[:19]:<20} {doc['run'] or '-':>4}  {doc['url'] or ''}"
        )


@env.command("status")
@click.argument("name", metavar="ENV")
@file_option
@home_option
@json_option
def env_status(name: str, pipeline_file: str, home: Path | None, as_json: bool) -> None:
    """What runs in ENV: digest, revision, run, since when, and whether it is up."""
    _, home_obj, spec, source, record = _context(pipeline_file, home)
    from conveyor.bootstrap import declared_ports

    doc = _status_doc(
        record, home_obj, source, _environment(spec, name), name, declared_ports(spec)
    )
    if as_json:
        echo_json(doc)
        return
    click.echo(f"{name}: {doc['status']}" + (f" since {doc['since']}" if doc["since"] else ""))
    if doc["deployment"] is not None:
        click.echo(f"  artifact    {doc['artifact']} {doc['digest']}")
        click.echo(f"  revision    {doc['revision']} (run {doc['run']})")
        click.echo(f"  deployment  {doc['deployment']} by {doc['deployed_by']}")
        if doc["running"] is not None:
            click.echo(f"  process     {'running' if doc['running'] else 'NOT running'}")
        if doc["url"]:
            click.echo(f"  url         {doc['url']}")
    if doc["deploying"] is not None:
        click.echo(f"  deploying   deployment {doc['deploying']} (in progress)")
    for item in doc["interrupted"]:
        click.echo(
            f"  interrupted deployment {item['deployment']} (run {item['run']}): its deployer"
            " stopped before the end; what it started may still run:"
            f" `conveyor env stop {name}` stops it, the next deployment replaces it"
        )
    for gate in doc["gates"]:
        note = f" (override {gate['override']})" if gate["override"] else ""
        click.echo(f"  gate        {gate['gate']}: {gate['verdict']}{note}: {gate['summary']}")


@env.command("history")
@click.argument("name", metavar="ENV")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, 100000),
    default=20,
    show_default=True,
    help="At most this many, newest first.",
)
@home_option
@json_option
def env_history(name: str, limit: int, home: Path | None, as_json: bool) -> None:
    """ENV's deployments, newest first: what, from which run, by whom, how it ended."""
    record = open_record_at(home)
    check_environment(record, name, repo_root(required=False))
    rows = record.deployments(name, limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no deployments to '{name}' yet")
        return
    click.echo(
        f"{'ID':>4}  {'STATUS':<12} {'ARTIFACT':<10} {'DIGEST':<20} {'RUN':>4}  {'BY':<20} STARTED"
    )
    for row in rows:
        click.echo(
            f"{row['id']:>4}  {row['status']:<12} {row['artifact'][:10]:<10}"
            f" {row['digest'][:19]:<20} {row['run']:>4}  {row['actor'][:20]:<20}"
            f" {row['started_at'][:19].replace('T', ' ')}"
        )
        if row["reason"]:
            click.echo(f"      {inline(row['reason'].replace(chr(10), ' ⏎ '))}")


@env.command("logs")
@click.argument("name", metavar="ENV")
@click.option(
    "--deployment",
    "deployment_id",
    type=click.IntRange(min=1, max=2**63 - 1),
    help="Whose output [default: the deployment that runs in ENV, else the latest].",
)
@click.option(
    "-n", "--lines", type=click.IntRange(min=0), help="Only the last N lines [default: all kept]."
)
@click.option(
    "-F", "--follow", is_flag=True, help="Keep printing new output while the release writes."
)
@click.option("--raw", is_flag=True, help="Print bytes as stored (escape sequences included).")
@file_option
@home_option
def env_logs(
    name: str,
    deployment_id: int | None,
    lines: int | None,
    follow: bool,
    raw: bool,
    pipeline_file: str,
    home: Path | None,
) -> None:
    """Print what a release in ENV printed: its service's or its scripts' output."""
    import time

    from conveyor.adapters.releaselogs import ReleaseLog
    from conveyor.adapters.targets.process import process_alive, recorded_writers
    from conveyor.app.deploy import unfinished_deployments
    from conveyor.domain.text import neutralise

    _, home_obj, spec, _, record = _context(pipeline_file, home)
    if name not in record.environment_names():
        _environment(spec, name)  # an unknown name: explained; a known one was never deployed
    row = record.deployment(deployment_id) if deployment_id else _shown_deployment(record, name)
    if row is None or row["environment"] != name:
        raise UsageError(
            f"environment '{name}' has no deployment {deployment_id}"
            if deployment_id
            else f"environment '{name}' has no deployment yet",
            hint=f"`conveyor env history {name}` lists its deployments",
        )
    number = int(row["id"])
    env_dir = home_obj.environments / name
    log = ReleaseLog(env_dir / "logs" / f"{number}.log")
    out = sys.stdout.buffer
    carry = b""

    def show(data: bytes, final: bool = False) -> None:
        nonlocal carry
        if raw:
            out.write(data)
        else:  # whole lines (or 1 MiB of one): a character is never cut in two
            data = carry + data
            cut = len(data) if final else data.rfind(b"\n") + 1
            if cut == 0 and len(data) > 1 << 20:
                cut = len(data)
                while cut > len(data) - 4 and data[cut - 1] & 0xC0 == 0x80:
                    cut -= 1  # inside a UTF-8 sequence: before its first byte
                if data[cut - 1] >= 0xC0:
                    cut -= 1
            carry = data[cut:]
            out.write(neutralise(data[:cut].decode("utf-8", "replace")).encode())
        out.flush()

    writers: set[tuple[int, int]] = set()

    def writing() -> bool:
        writers.update(recorded_writers(env_dir, number))
        if any(process_alive(pid, start) for pid, start in writers):
            return True
        in_progress, _ = unfinished_deployments(record, name)
        return any(item["id"] == number for item in in_progress)

    from conveyor.adapters.releaselogs import kept_files

    if not kept_files(log.path) and not (follow and writing()):
        click.echo(f"(deployment {number} has no output kept in {log.path.parent})", err=True)
    try:
        for chunk in log.kept(lines):
            show(chunk)
        while follow:
            data = log.new()
            if log.gap:
                log.gap = False
                show(b"", final=True)
                click.echo(
                    f"conveyor: some output of deployment {number} may have been rotated away"
                    " before it could be shown (logs.max_size is small for how fast it writes)",
                    err=True,
                )
            if data:
                show(data)
                continue
            if not writing():
                data = log.new()  # what the last writer wrote on its way out
                if not data:
                    break
                show(data)
                continue
            time.sleep(0.2)
        show(b"", final=True)
    finally:
        log.close()


def _shown_deployment(record: Any, name: str) -> dict[str, Any] | None:
    """The deployment that runs (or last ran) in ``name``, else its latest one."""
    state = record.environment_state(name)
    if state is not None and state["deployment"] is not None:
        return dict(record.deployment(state["deployment"]))
    latest = record.deployments(name, 1)
    return latest[0] if latest else None


@env.command("stop")
@click.argument("name", metavar="ENV")
@click.option(
    "--as",
    "as_user",
    callback=not_empty,
    help="Who stops it [default: CONVEYOR_USER or git user.email].",
)
@file_option
@home_option
def env_stop(name: str, as_user: str | None, pipeline_file: str, home: Path | None) -> None:
    """Stop what runs in ENV (recorded; the next deployment starts it again)."""
    from conveyor.app.deploy import take_lease
    from conveyor.cli.main import _actor

    root, home_obj, spec, source, record = _context(pipeline_file, home)
    spec_env = _environment(spec, name)
    actor = _actor(as_user, root)
    token = take_lease(record, name, actor)
    try:
        # First what a killed deployer left: its new release may be serving, unrecorded.
        from conveyor.bootstrap import declared_ports, make_deployer

        reserved = declared_ports(spec)
        make_deployer(
            home_obj, record, source, click.echo, reserved_ports=reserved
        ).recover_interrupted(spec_env, (name, token), restart=False)
        _stop_leased(record, home_obj, source, spec_env, name, actor, token, reserved)
    finally:
        record.release_lease(name, token)


def _stop_leased(
    record: Any,
    home_obj: Any,
    source: Any,
    spec_env: Any,
    name: str,
    actor: str,
    token: int,
    reserved: frozenset[int] = frozenset(),
) -> None:
    from conveyor.bootstrap import make_target
    from conveyor.domain import delivery_events as de
    from conveyor.domain.delivery import Release

    state = record.environment_state(name)  # read under the lease: it cannot change now
    if state is not None and state["status"] == "unknown" and state["deployment"] is None:
        click.echo(
            f"what runs in '{name}' is not known (a deployment's scripts left it so), and no"
            " release is recorded to stop"
        )
        return
    if (
        state is None
        or state["deployment"] is None
        or state["status"] not in ("running", "unknown")
    ):
        click.echo(f"nothing runs in '{name}'")
        return
    row = record.deployment(state["deployment"])
    release = Release(
        environment=name,
        deployment_id=row["id"],
        artifact=row["artifact"],
        digest=row["digest"],
        folder=str(home_obj.environments / name / "releases" / str(row["id"])),
        artifact_path="",
        revision=row["revision"],
    )
    make_target(home_obj, source, spec_env, release, reserved_ports=reserved).stop(release)
    record.append(
        [
            de.EnvironmentStopped(
                run_id=row["run"], environment=name, deployment_id=row["id"], actor=actor
            )
        ],
        fence=(name, token),
    )
    click.echo(f"stopped deployment {row['id']} in '{name}'")
