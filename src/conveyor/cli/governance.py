"""Gates and their escape hatches, users, incidents and the DORA keys:
``users``, ``approve``, ``override``, ``gates check``, ``report overrides``, ``incident``,
``metrics``."""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
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
)
from conveyor.domain.text import inline
from conveyor.errors import PermissionDenied, UsageError

as_option = click.option(
    "--as",
    "as_user",
    callback=not_empty,
    help="Who does it [default: $CONVEYOR_USER, else git user.email, else $USER].",
)


def _who(as_user: str | None) -> str:
    from conveyor.cli.common import repo_root
    from conveyor.cli.main import _actor

    return _actor(as_user, repo_root(required=False))


def _parse_since(text: str) -> float:
    from conveyor.spec.durations import parse_duration

    try:
        return time.time() - parse_duration(text, maximum=20 * 365 * 86400.0)
    except ValueError as exc:
        raise UsageError(f"--since {text}: {exc}", hint="e.g. --since 30d or --since 12h") from exc


def _utc_text(moment: datetime) -> str:
    """A time as the record writes them: UTC, ISO 8601, microseconds, ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _epoch_text(epoch: float) -> str:
    return _utc_text(datetime.fromtimestamp(epoch, UTC))


# -- users ---------------------------------------------------------------------------------


@click.group()
def users() -> None:
    """Who may approve and override: users and their roles, kept in Conveyor's home."""


@users.command("add")
@click.argument("name")
@click.option("--role", "roles", multiple=True, required=True, help="A role (repeatable).")
@as_option
@home_option
def users_add(name: str, roles: tuple[str, ...], as_user: str | None, home: Path | None) -> None:
    """Give NAME these roles (replacing earlier ones). Needs the admin role, except for the
    first user."""
    from conveyor.domain import delivery_events as de

    if not re.fullmatch(r"[^\s\x00-\x1f]{1,200}", name):
        raise UsageError(f"'{name[:40]}' is not a user name", hint="e.g. an e-mail address")
    from conveyor.spec.delivery import ROLE_HINT, ROLE_NAME

    for role in roles:
        if not re.fullmatch(ROLE_NAME, role):
            raise UsageError(f"'{role[:40]}' is not a role name", hint=ROLE_HINT)
    record = open_record_at(home)
    actor = _who(as_user)
    existing = record.users()
    record.change_user(
        de.UserChanged(run_id=0, name=name, roles=sorted(set(roles)), actor=actor), actor
    )
    click.echo(f"{name}: {', '.join(sorted(set(roles)))}")
    if not existing and "admin" not in roles:
        click.echo("note: the first user is not an admin; nobody can change users now", err=True)


@users.command("list")
@home_option
@json_option
def users_list(home: Path | None, as_json: bool) -> None:
    """Every user and their roles."""
    items = open_record_at(home).users()
    if as_json:
        echo_json(items)
        return
    if not items:
        click.echo("no users yet: `conveyor users add you@example.com --role admin`")
        return
    for item in items:
        click.echo(f"{item['name']:<40} {', '.join(item['roles'])}")


# -- approvals and overrides ---------------------------------------------------------------------


def _target(pipeline_file: str, home: Path | None, ref: str, environment: str) -> tuple[Any, ...]:
    from conveyor.cli.environments import _artifact_of, _context, _environment

    root, home_obj, spec, source, record = _context(pipeline_file, home)
    env = _environment(spec, environment)
    item = _artifact_of(record, spec, ref, None)
    return root, home_obj, spec, source, record, env, item


@click.command()
@click.argument("ref", metavar="RUN|ARTIFACT")
@click.option("--environment", "-e", "environment", required=True, help="For this environment.")
@click.option("--comment", "-m", default="", help="Why, or what was checked.")
@as_option
@file_option
@home_option
def approve(
    ref: str,
    environment: str,
    comment: str,
    as_user: str | None,
    pipeline_file: str,
    home: Path | None,
) -> None:
    """Approve an artifact digest for an environment (counts for its approval gates).

    The approval is bound to that digest: another build needs its own approvals.
    """
    from conveyor.domain import delivery_events as de

    _, _, _, _, record, env, item = _target(pipeline_file, home, ref, environment)
    actor = _who(as_user)
    roles = record.roles_of(actor) or []
    record.append(
        [
            de.ApprovalGiven(
                run_id=item.run_id,
                environment=env.name,
                digest=item.digest,
                approver=actor,
                roles=roles,
                comment=comment,
            )
        ]
    )
    click.echo(
        f"{actor} approved {item.name}@{item.run_id} ({item.digest[:19]}…) for {env.name}"
        + (f" with roles {', '.join(roles)}" if roles else " (holding no role)")
    )


def _check_reason(reason: str) -> None:
    words = re.findall(r"\w{2,}", reason)  # letters of any script: a reason may be in any language
    if len(reason.strip()) < 15 or len(set(w.lower() for w in words)) < 3:
        raise UsageError(
            "the reason must say why, in a sentence (at least 15 characters and 3 different words)",
            hint='e.g. --reason "hotfix for INC-42, coverage report broken by the new tool"',
        )


@click.command()
@click.argument("ref", metavar="RUN|ARTIFACT", required=False)
@click.option("--gate", help="The gate to let pass.")
@click.option("--environment", "-e", "environment", help="In this environment.")
@click.option("--reason", help="Why (required, recorded, shown next to the failing evidence).")
@click.option("--expires", help="How long it holds (e.g. 2h) [default: the environment's].")
@click.option(
    "--confirm",
    "confirm_id",
    type=click.IntRange(1, 2**62),
    metavar="ID",
    help="Confirm override ID (second person).",
)
@as_option
@file_option
@home_option
@json_option
def override(
    ref: str | None,
    gate: str | None,
    environment: str | None,
    reason: str | None,
    expires: str | None,
    confirm_id: int | None,
    as_user: str | None,
    pipeline_file: str,
    home: Path | None,
    as_json: bool,
) -> None:
    """Let one failed gate pass for one artifact digest in one environment, until it expires.

    Needs a role in the environment's override_roles (default: overrider, admin). The gate's
    failing evidence stays on the record next to the override.
    """
    from conveyor.domain import delivery_events as de
    from conveyor.spec.durations import parse_duration

    if confirm_id is not None:
        _confirm(confirm_id, as_user, pipeline_file, home, as_json)
        return
    missing = [o for o, v in (("--gate", gate), ("--environment", environment)) if not v]
    if ref is None or missing:
        raise UsageError(
            "override needs RUN|ARTIFACT, --gate and --environment"
            + (f" (missing {', '.join(missing)})" if missing else ""),
            hint='conveyor override app@12 --gate tests --environment production --reason "..."',
        )
    if not reason:
        raise UsageError("an override needs --reason: it is recorded and reported")
    _check_reason(reason)
    assert environment is not None and gate is not None
    _, _, _, _, record, env, item = _target(pipeline_file, home, ref, environment)
    names = [g.name for g in env.gates]
    if gate not in names:
        raise UsageError(
            f"environment '{env.name}' has no gate '{gate}'",
            hint="its gates: " + (", ".join(names) or "none"),
        )
    actor = _who(as_user)
    _require_override_role(record, env, actor)
    seconds = env.override_expiry_s
    if expires:
        try:
            seconds = parse_duration(expires)
        except ValueError as exc:
            raise UsageError(f"--expires {expires}: {exc}") from exc
    if seconds > env.override_max_s:
        raise UsageError(
            f"--expires {expires} is longer than environment '{env.name}' allows"
            f" ({env.override_max_s / 3600:g} h)",
            hint="overrides are short-lived by design; grant a new one if it is still needed",
        )
    now = time.time()
    override_id = record.allocate_id("override")
    record.append(
        [
            de.OverrideGranted(
                run_id=item.run_id,
                override_id=override_id,
                environment=env.name,
                gate=gate,
                digest=item.digest,
                actor=actor,
                reason=reason,
                created_epoch=now,
                expires_epoch=now + seconds,
                needs_confirmation=env.override_confirm,
            )
        ]
    )
    if as_json:
        echo_json(record.override(override_id))
        return
    click.echo(
        f"override {override_id}: gate '{gate}' may pass for {item.name}@{item.run_id}"
        f" ({item.digest[:19]}…) in {env.name} until {_epoch_text(now + seconds)}"
    )
    if env.override_confirm:
        click.echo(
            f"it needs a second person: `conveyor override --confirm {override_id}` by another"
            " user with an override role"
        )


def _require_override_role(record: Any, env: Any, actor: str) -> None:
    roles = set(record.roles_of(actor) or [])
    if not roles & set(env.override_roles):
        raise PermissionDenied(
            f"{actor} may not override gates of '{env.name}': that needs one of the roles"
            f" {', '.join(env.override_roles)}",
            hint="an admin grants roles: conveyor users add NAME --role overrider",
        )


def _confirm(
    override_id: int, as_user: str | None, pipeline_file: str, home: Path | None, as_json: bool
) -> None:
    from conveyor.cli.environments import _context, _environment
    from conveyor.domain import delivery_events as de

    _, _, spec, _, record = _context(pipeline_file, home)
    item = record.override(override_id)
    if item is None:
        raise UsageError(f"there is no override {override_id}")
    if not item["needs_confirmation"]:
        raise UsageError(
            f"override {override_id} needs no confirmation: it was granted in force",
            hint="only environments with 'overrides: {confirm: true}' ask a second person",
        )
    env = _environment(spec, item["environment"])
    actor = _who(as_user)
    _require_override_role(record, env, actor)
    if actor == item["actor"]:
        raise PermissionDenied(
            f"{actor} granted override {override_id}; another person must confirm it"
        )
    if item["confirmed_by"]:
        raise UsageError(f"override {override_id} was already confirmed by {item['confirmed_by']}")
    if item["expires_epoch"] <= time.time():
        raise UsageError(f"override {override_id} has expired; grant a new one")
    record.append([de.OverrideConfirmed(run_id=item["run"], override_id=override_id, actor=actor)])
    if as_json:
        echo_json(record.override(override_id))
        return
    click.echo(f"override {override_id} confirmed by {actor}")


# -- gates check -----------------------------------------------------------------------------------


@click.group()
def gates() -> None:
    """Gates: what an environment would say about an artifact, now or at another time."""


@gates.command("check")
@click.argument("environment", metavar="ENV")
@click.argument("ref", metavar="[RUN|ARTIFACT]", required=False)
@click.option("--at", "at_text", help="At this time (ISO 8601, e.g. 2026-12-24T17:00:00+01:00).")
@file_option
@home_option
@json_option
def gates_check(
    environment: str,
    ref: str | None,
    at_text: str | None,
    pipeline_file: str,
    home: Path | None,
    as_json: bool,
) -> None:
    """Evaluate ENV's gates without deploying (nothing is recorded). Without an artifact only
    the window gates are evaluated. Exit 0 if a deployment would be allowed, 1 if not."""
    from conveyor.app.gates import environment_gates, evaluate_gate
    from conveyor.cli.environments import _artifact_of, _context, _environment

    _, _, spec, source, record = _context(pipeline_file, home)
    env = _environment(spec, environment)
    at = datetime.now(UTC)
    if at_text:
        try:
            at = datetime.fromisoformat(at_text.replace("Z", "+00:00"))
            if at.tzinfo is not None:
                at.astimezone(UTC)
        except (ValueError, OverflowError) as exc:
            raise UsageError(f"--at {at_text}: not an ISO 8601 time we can use") from exc
        if at.tzinfo is None:
            raise UsageError(f"--at {at_text} has no time zone", hint="add Z or +01:00")
        if not 1970 <= at.astimezone(UTC).year <= 9998:
            raise UsageError(f"--at {at_text}: choose a year between 1970 and 9998")
    results: list[dict[str, Any]] = []
    if ref is not None:
        item = _artifact_of(record, spec, ref, None)
        facts = record.run_facts(item.run_id) or {}
        outcomes = environment_gates(
            record,
            env,
            item,
            at=at,
            authors=lambda: source.authors_of(
                facts.get("revision", ""), record.successful_revisions(env.name)
            ),
        )
        for o in outcomes:
            results.append(_result(o.verdict, o.status, o.override_id))
    else:
        for gate in env.gates:
            if gate.kind != "window":
                results.append(
                    {
                        "gate": gate.name,
                        "kind": gate.kind,
                        "status": "not evaluated",
                        "summary": "give an artifact (RUN|ARTIFACT) to evaluate it",
                        "evidence": {},
                    }
                )
                continue
            verdict = evaluate_gate(
                gate,
                record=record,
                run_id=0,
                environment=env,
                digest="",
                at=at,
                authors=lambda: (),
            )
            results.append(_result(verdict, "passed" if verdict.passed else "failed", None))
    allowed = not any(r["status"] == "failed" for r in results)
    if as_json:
        echo_json(
            {"environment": env.name, "at": _utc_text(at), "allowed": allowed, "gates": results}
        )
    else:
        click.echo(f"{env.name} at {_utc_text(at)}:")
        for r in results:
            click.echo(f"  {r['status']:<13} {r['gate']:<12} {r['summary']}")
        click.echo("a deployment would be allowed" if allowed else "a deployment would be refused")
    if not allowed:
        sys.exit(EXIT_FAILED)


def _result(verdict: Any, status: str, override_id: int | None) -> dict[str, Any]:
    return {
        "gate": verdict.gate,
        "kind": verdict.kind,
        "status": status,
        "summary": verdict.summary,
        "evidence": dict(verdict.evidence),
        "override": override_id,
    }


# -- report ---------------------------------------------------------------------------------


@click.group()
def report() -> None:
    """Reports from the record."""


@report.command("overrides")
@click.option("--since", default="30d", show_default=True, help="How far back (e.g. 30d, 12h).")
@home_option
@json_option
def report_overrides(since: str, home: Path | None, as_json: bool) -> None:
    """Overrides per environment, gate and person, and the override rate of deployments."""
    record = open_record_at(home)
    since_epoch = _parse_since(since)
    items = record.list_overrides(since_epoch)
    groups: dict[tuple[str, str, str], int] = {}
    for item in items:
        key = (item["environment"], item["gate"], item["actor"])
        groups[key] = groups.get(key, 0) + 1
    rates = record.override_rates(since_epoch)
    doc = {
        "since": _epoch_text(since_epoch),
        "overrides": items,
        "by_environment_gate_person": [
            {"environment": e, "gate": g, "person": p, "count": n}
            for (e, g, p), n in sorted(groups.items())
        ],
        "override_rate": rates,
    }
    if as_json:
        echo_json(doc)
        return
    click.echo(f"overrides since {doc['since']}: {len(items)}")
    for row in doc["by_environment_gate_person"]:
        click.echo(
            f"  {row['environment']:<14} {row['gate']:<12} {row['person']:<30} {row['count']}"
        )
    for env_name, rate in sorted(rates.items()):
        click.echo(
            f"  {env_name}: {rate['overridden']} of {rate['deployments']} deployments needed an"
            f" override ({rate['rate'] * 100:.1f}%)"
            if rate["deployments"]
            else f"  {env_name}: no deployments"
        )
    for item in items:
        state = "expired" if item["expires_epoch"] <= time.time() else "active"
        if item["needs_confirmation"] and not item["confirmed_by"]:
            state += ", unconfirmed"
        click.echo(
            f"  #{item['id']} {item['environment']}/{item['gate']} {item['digest'][:19]}… by"
            f" {inline(item['actor'])} ({state}, used {item['used']}x): {inline(item['reason'])}"
        )


# -- incidents ---------------------------------------------------------------------------------


@click.group()
def incident() -> None:
    """Incidents in an environment (they count in the change failure rate and recovery time)."""


@incident.command("open")
@click.option("--environment", "-e", "environment", required=True, help="Where it happens.")
@click.option(
    "--deployment",
    type=int,
    help="The deployment that caused it [default: the one running in the environment].",
)
@click.option("--title", required=True, help="What is wrong.")
@as_option
@home_option
@json_option
def incident_open(
    environment: str,
    deployment: int | None,
    title: str,
    as_user: str | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Open an incident, linked to a deployment."""
    from conveyor.domain import delivery_events as de

    if not title.strip():
        raise UsageError("--title must say what is wrong", hint='e.g. --title "checkout 500s"')
    record = open_record_at(home)
    check_environment(record, environment, repo_root(required=False))
    if deployment is None:
        state = record.environment_state(environment)
        deployment = state["deployment"] if state else None
    elif record.deployment(deployment) is None:
        raise UsageError(f"there is no deployment {deployment}")
    row = record.deployment(deployment) if deployment is not None else None
    if row is not None and row["environment"] != environment:
        raise UsageError(f"deployment {deployment} went to {row['environment']}, not {environment}")
    incident_id = record.allocate_id("incident")
    record.append(
        [
            de.IncidentOpened(
                run_id=row["run"] if row else 0,
                incident_id=incident_id,
                environment=environment,
                deployment_id=deployment,
                title=title,
                actor=_who(as_user),
                opened_epoch=time.time(),
            )
        ]
    )
    if as_json:
        echo_json(record.incident(incident_id))
        return
    click.echo(
        f"incident {incident_id} opened in {environment}"
        + (f", linked to deployment {deployment}" if deployment is not None else "")
    )


@incident.command("list")
@click.option("--environment", "-e", "environment", help="Only this environment's.")
@click.option("--unresolved", is_flag=True, help="Only the incidents not resolved yet.")
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(1, 100000),
    default=50,
    show_default=True,
    help="At most this many, newest first.",
)
@home_option
@json_option
def incident_list(
    environment: str | None, unresolved: bool, limit: int, home: Path | None, as_json: bool
) -> None:
    """Incidents, newest first."""
    record = open_record_at(home)
    if environment is not None:
        check_environment(record, environment, repo_root(required=False))
    items = record.incidents(environment, unresolved=unresolved, limit=limit)
    if as_json:
        echo_json(items)
        return
    if not items:
        click.echo("no incidents" + (" unresolved" if unresolved else ""))
        return
    click.echo(
        f"{'ID':>5}  {'ENVIRONMENT':<16} {'DEPLOYMENT':>10}  {'OPENED':<20} {'STATE':<10} TITLE"
    )
    for item in items:
        deployment = "-" if item["deployment"] is None else str(item["deployment"])
        state = "resolved" if item["resolved_at"] else "open"
        click.echo(
            f"{item['id']:>5}  {inline(item['environment'])[:16]:<16} {deployment:>10}"
            f"  {item['opened_at'][:19]:<20} {state:<10} {inline(item['title'])}"
        )


@incident.command("resolve")
@click.argument("incident_id", type=click.IntRange(1, 2**62), metavar="ID")
@as_option
@home_option
def incident_resolve(incident_id: int, as_user: str | None, home: Path | None) -> None:
    """Resolve an incident."""
    from conveyor.domain import delivery_events as de

    record = open_record_at(home)
    item = record.incident(incident_id)
    if item is None:
        unresolved = [str(i["id"]) for i in record.incidents(unresolved=True, limit=10)]
        raise UsageError(
            f"there is no incident {incident_id}",
            hint=(
                f"unresolved incidents: {', '.join(unresolved)} (conveyor incident list)"
                if unresolved
                else "no incident is unresolved (conveyor incident list shows them all)"
            ),
        )
    if item["resolved_at"]:
        raise UsageError(f"incident {incident_id} was resolved at {item['resolved_at']}")
    row = record.deployment(item["deployment"]) if item["deployment"] is not None else None
    record.append(
        [
            de.IncidentResolved(
                run_id=row["run"] if row else 0,
                incident_id=incident_id,
                actor=_who(as_user),
                resolved_epoch=time.time(),
            )
        ]
    )
    click.echo(f"incident {incident_id} resolved")


# -- metrics ---------------------------------------------------------------------------------


@click.command()
@click.option("--since", default="30d", show_default=True, help="The window (e.g. 30d, 90d).")
@click.option(
    "--environment",
    "-e",
    "environment",
    default="production",
    show_default=True,
    help="The environment whose deployments count.",
)
@home_option
@json_option
def metrics(since: str, environment: str, home: Path | None, as_json: bool) -> None:
    """The DORA keys of an environment, computed from the record."""
    from conveyor.cli.common import home_of, repo_root
    from conveyor.store.metrics import metrics as compute

    home_obj = home_of(home, None if home is not None else repo_root())
    record = open_record_at(home_obj.root)  # create or migrate the record first
    try:
        check_environment(record, environment, repo_root(required=False))
    finally:
        record.close()
    try:
        doc = compute(home_obj.database, environment, _parse_since(since), time.time())
    except ValueError as exc:
        raise UsageError(f"--since {since}: {exc}") from exc
    if as_json:
        echo_json(doc)
        return
    _print_metrics(doc)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _print_metrics(doc: dict[str, Any]) -> None:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}%"

    def hours(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} h"

    levels = doc.get("levels", {})

    def level(key: str) -> str:
        item = levels.get(key) or {}
        return f"  [{item.get('level') or 'n/a'}]"

    lead = doc["lead_time_hours"]
    recovery = doc["recovery_time_hours"]
    click.echo(
        f"{doc['environment']}, {doc['since'][:10]} to {doc['until'][:10]}"
        f" ({_count(round(doc['window_days']), 'day')})"
    )
    click.echo(
        f"  deployment frequency   {doc['deployment_frequency_per_day']:.2f}/day"
        f" ({_count(doc['deployments'], 'deployment')}){level('deployment_frequency_per_day')}"
    )
    click.echo(
        f"  lead time for changes  median {hours(lead['median'])}, p90 {hours(lead['p90'])}"
        f" ({_count(lead['commits'], 'commit')}"
        + (f", {lead['skewed']} with a skewed clock" if lead.get("skewed") else "")
        + f"){level('lead_time_hours')}"
    )
    click.echo(
        f"  change failure rate    {pct(doc['change_failure_rate'])}"
        f" of {doc['attempted_deployments']}{level('change_failure_rate')}"
    )
    click.echo(
        f"  recovery time          median {hours(recovery['median'])} ({recovery['count']}"
        f" recovered, {recovery['unrecovered']} not yet){level('recovery_time_hours')}"
    )
    click.echo(f"  rework rate            {pct(doc['rework_rate'])}")
    click.echo(f"  override rate          {pct(doc['override_rate'])}")
    report = next((v.get("report") for v in levels.values() if v and v.get("report")), None)
    if report:
        click.echo(f"levels: {report}")
