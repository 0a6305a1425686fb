"""Deployments: put one verified artifact digest into one environment, or roll back by itself.

The path is the same for a deploy stage of a run and for ``conveyor promote``:

1. **Policy** (nothing changes if it refuses): the artifact verifies (bytes, signature, subject,
   builder: the checks of ``conveyor verify``); it was built from a branch the environment
   accepts; the stages the environment requires passed in a run that published those bytes; a
   build of a dirty working tree goes only to environments without such a policy.
2. **Lease**: one deployment per environment at a time. The lease has an expiry, and a holder
   on this machine whose process is gone is taken over at once, so a crashed deployer never
   locks an environment for good. Each acquisition has a greater token, and every event of the
   deployment is written fenced by it: a stale deployer cannot write after a newer one.
   Deployments a dead deployer left unfinished are recorded ``interrupted`` and their release
   stopped.
3. **Release**: the artifact is unpacked (safely) into ``environments/<env>/releases/<id>/``.
4. **Strategy** *recreate*: stop the current release, start the new one, wait for it to be
   healthy; if it is not, stop it, start the previous release again and check it: the
   deployment is ``rolled_back`` (or ``failed`` if nothing healthy runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conveyor.adapters.trash import TRASH, discard
from conveyor.app.artifacts import verify
from conveyor.domain import delivery_events as de
from conveyor.domain import events as ev
from conveyor.domain.canonical import canonical_json
from conveyor.domain.delivery import ArtifactRecord, DeploymentOutcome, Health, Release, Target
from conveyor.domain.masking import Masker
from conveyor.errors import ConveyorError, DeployCancelled, DeployError, LeaseLost, NotStarted
from conveyor.spec.delivery import EnvironmentSpec

STRATEGY = "recreate"
LEASE_MARGIN_S = 120.0
"""Added to a deployment's worst-case duration to get its lease's lifetime."""
SCRIPT_TIMEOUT_S = 600.0
"""How long one script of a ``command`` target may run (the target's default)."""
STOP_TIMEOUT_S = 10.0
KEEP_RELEASES = 5
"""Release folders (and checkouts) kept per environment: the newest deployments' and the
running one's; a promotion of an older artifact unpacks it again from the store."""


Outcome = DeploymentOutcome


@dataclasses.dataclass
class _Steps:
    """How far a deployment got, for the record when it breaks off."""

    previous: str = "none"
    """The release it replaces: ``none``, ``running`` (its stop had not begun, or it was
    restored), ``stopped``, ``restarted`` (stopped, then started again by a cancel), or
    ``unknown`` (a script of the user's was replacing it)."""
    new: str = "not started"
    """The new release: ``not started``, ``started`` (its start began), ``in place`` (its
    start returned), ``stopped``."""
    unhealthy: str = ""
    """Why the new release was found unhealthy, once it was."""
    uncertain: bool = False
    """Whether what runs at the end is not known (a user's scripts own the service)."""
    cut_short: bool = False
    restart_tried: bool = False
    """Whether starting the replaced release again was tried already (once is enough)."""
    """Whether a cancel cut a step short (the rollback's health check)."""


CANCELLED = "the deployment was cancelled (Ctrl-C or SIGTERM)"
NOTHING_CHANGED = "cancelled (Ctrl-C or SIGTERM) before the deployment began: it changed nothing"
RECOVERED_ONLY = (
    "cancelled (Ctrl-C or SIGTERM) before the deployment began: it only ended what a dead"
    " deployer left unfinished (`conveyor env history` says what became of it)"
)


def _previous_after_break(deployment_id: int, state: str) -> str:
    """For the record of a deployment that broke off: what became of the release it replaced."""
    if state == "running":
        return f"deployment {deployment_id} still runs"
    if state == "restarted":
        return f"deployment {deployment_id} was started again (its health was not checked)"
    if state == "stopped":
        return (
            f"deployment {deployment_id} was stopped before it and could not be started again:"
            " promote its artifact again to restore it"
        )
    return (
        f"whether deployment {deployment_id} still runs is not known: promote the release you"
        " want to be sure"
    )


def refusal(message: str, hint: str | None = None) -> DeployError:
    """A policy refusal: nothing was changed."""
    return DeployError(f"refused: {message}", hint=hint or "nothing was changed")


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
"""A file artifact named so is unpacked into the release folder; any other is placed as is."""


class Deployer:
    """Runs deployments against the record, the artifact store and the targets.

    ``make_target`` builds the target of an environment (``bootstrap`` knows the adapters);
    ``now`` is wall-clock seconds (leases), ``timestamp`` an ISO time (records).
    """

    def __init__(
        self,
        *,
        record: Any,
        store: Any,
        public_pem: str,
        builder_id: str,
        environments_dir: Path,
        make_target: Callable[[EnvironmentSpec, Release], Target],
        now: Callable[[], float] = time.time,
        wait_s: float = 0.0,
        say: Callable[[str], None] = lambda _: None,
        commits: Callable[[str, Sequence[str]], list[tuple[str, float]]] | None = None,
        authors: Callable[[str, Sequence[str]], list[str]] | None = None,
        masker: Masker | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        finished: Callable[[], None] = lambda: None,
    ) -> None:
        self.cancelled = cancelled
        """Whether Ctrl-C or SIGTERM asked to stop: looked at between the steps of a
        deployment and while it waits (never in the middle of a step), then the deployment
        stops cleanly (``DeployCancelled``)."""
        self.finished = finished
        """Called when a deployment is over: the targets release what they held for it."""
        self.masker = masker or Masker(())
        """The pipeline's secrets: masked in what is said and recorded (a release's output
        reaches the deployment's health and reason)."""
        self.record = record
        self.store = store
        self.public_pem = public_pem
        self.builder_id = builder_id
        self.environments_dir = environments_dir
        self.make_target = make_target
        self.now = now
        self.wait_s = wait_s
        self.say = (lambda text: say(self.masker.mask_text(text))) if self.masker else say
        self.commits = commits
        """Commits (sha, commit time) in a revision and not in the given ones (git)."""
        self.authors = authors
        """The authors of the commits a revision brings that the given deployed revisions
        lack, for ``approval`` gates with ``not_author``."""

    # -- policy ------------------------------------------------------------------------------

    def _append(self, events: Sequence[Any], **options: Any) -> None:
        """Append to the record, secrets masked."""
        self.record.append([self.masker.mask_event(e) for e in events], **options)

    def check_policy(
        self,
        environment: EnvironmentSpec,
        item: ArtifactRecord,
        revision: str = "",
        *,
        gates: bool = True,
    ) -> bool:
        """Refuse, with the reason, an artifact the environment must not accept.

        Returns whether an override let a failed gate pass. Gate verdicts are recorded.
        """
        result = verify(item, self.store, self.public_pem, self.builder_id)
        if not result.ok:
            failure = result.failures()[0]
            raise refusal(
                f"{item.name}@{item.run_id} ({item.digest}) does not verify: {failure.name}:"
                f" {failure.detail}",
                hint="only artifacts this instance built and signed can be deployed;"
                " `conveyor verify` explains every check",
            )
        problems = policy_problems(self.record, environment, item)
        if problems:
            message, hint = problems[0]
            raise refusal(message, hint=hint)
        return self.check_gates(environment, item, revision) if gates else False

    def check_gates(
        self, environment: EnvironmentSpec, item: ArtifactRecord, revision: str
    ) -> bool:
        """Evaluate and record the environment's gates; refuse if one blocks."""
        if not environment.gates:
            return False
        from conveyor.app.gates import environment_gates

        authors = self.authors
        outcomes = environment_gates(
            self.record,
            environment,
            item,
            now_epoch=self.now(),
            authors=lambda: (
                authors(revision, self.record.successful_revisions(environment.name))
                if authors and revision
                else []
            ),
        )
        self._append(
            [
                ev.GateEvaluated(
                    run_id=item.run_id,
                    environment=environment.name,
                    stage="",
                    digest=item.digest,
                    gate=o.verdict.gate,
                    gate_kind=o.verdict.kind,
                    verdict=o.status,
                    summary=o.verdict.summary,
                    evidence=dict(o.verdict.evidence),
                    override_id=o.override_id,
                )
                for o in outcomes
            ]
        )
        for o in outcomes:
            mark = {"passed": "ok  ", "failed": "FAIL", "overridden": "OVERRIDDEN"}[o.status]
            self.say(f"gate {o.verdict.gate}: {mark} {o.verdict.summary}")
        blocking = [o for o in outcomes if o.blocks]
        if blocking:
            first = blocking[0].verdict
            raise refusal(
                f"gate '{first.gate}' of environment '{environment.name}' failed: {first.summary}",
                hint="fix what the gate measures, or, in an emergency, `conveyor override"
                f" {item.name}@{item.run_id} --gate {first.gate} --environment"
                f" {environment.name} --reason ...`",
            )
        return any(o.status == "overridden" for o in outcomes)

    # -- the deployment ----------------------------------------------------------------------

    def deploy(
        self,
        environment: EnvironmentSpec,
        item: ArtifactRecord,
        *,
        revision: str,
        actor: str,
        trigger: str,
        hotfix: bool = False,
    ) -> Outcome:
        """Deploy ``item`` to ``environment`` (see the module docstring)."""
        self.check_policy(environment, item, revision, gates=False)
        token = self._acquire(environment, actor)
        fence = (environment.name, token)
        try:
            self._refuse_if_cancelled()
            # Gates are evaluated once the lease is held: a window, an override's expiry or the
            # coverage baseline may have changed while this deployment waited for it.
            overridden = self.check_gates(environment, item, revision)
            self._refuse_if_cancelled()
            return self._deploy_leased(
                environment, item, revision, actor, trigger, fence, hotfix, overridden
            )
        finally:
            try:
                self.finished()
            finally:
                self.record.release_lease(environment.name, token)

    def _acquire(self, environment: EnvironmentSpec, actor: str) -> int:
        name = environment.name
        deadline = self.now() + self.wait_s
        said = False
        while True:
            token, holder = self.record.acquire_lease(
                name,
                f"{actor} (pid {os.getpid()})",
                pid=os.getpid(),
                host=socket.gethostname(),
                ttl_s=self._ttl(environment),
                now=self.now(),
                holder_gone=_holder_gone,
            )
            if token is not None:
                return int(token)
            assert holder is not None
            if self.now() >= deadline:
                raise DeployError(
                    f"environment '{name}' is being deployed by {holder['holder']}"
                    f" on {holder['host']} (lease expires in {holder['expires_in_s']} s)",
                    hint="wait for it to finish, or pass --wait SECONDS",
                )
            if not said:
                self.say(f"waiting for the deployment of {holder['holder']} to '{name}' to end")
                said = True
            if self.cancelled():
                raise DeployCancelled(
                    f"cancelled (Ctrl-C or SIGTERM) while waiting for the lease on '{name}':"
                    " nothing was changed"
                )
            time.sleep(0.2)

    def _ttl(self, environment: EnvironmentSpec | None = None) -> float:
        """The lease's lifetime: longer than the worst case of one deployment (two health
        deadlines, and two stops or two scripts), so that a live deployer never loses it; a
        dead one is taken over at once on the same machine. The lease is also renewed between
        the steps of a deployment."""
        timeout = environment.health_timeout_s if environment else 60.0
        steps = (
            SCRIPT_TIMEOUT_S
            if environment and environment.target.type == "command"
            else (STOP_TIMEOUT_S)
        )
        return 2 * timeout + 3 * steps + LEASE_MARGIN_S

    def _deploy_leased(
        self,
        environment: EnvironmentSpec,
        item: ArtifactRecord,
        revision: str,
        actor: str,
        trigger: str,
        fence: tuple[str, int],
        hotfix: bool = False,
        overridden: bool = False,
    ) -> Outcome:
        name = environment.name
        recovered = self.recover_interrupted(environment, fence)
        if recovered and self.cancelled():
            raise DeployCancelled(RECOVERED_ONLY)
        state = self.record.environment_state(name)
        previous_row = (
            self.record.deployment(state["deployment"])
            if state and state["deployment"] is not None
            else None
        )
        deployment_id = self.record.allocate_deployment_id()
        release = self._prepare(environment, item, deployment_id, revision)
        if self.cancelled():
            shutil.rmtree(release.folder, ignore_errors=True)
            Path(release.folder).with_suffix(".path").unlink(missing_ok=True)
            raise DeployCancelled(RECOVERED_ONLY if recovered else NOTHING_CHANGED)
        # A release someone stopped (`env stop`) is not restarted by a rollback: the
        # environment was meant to be down, and stays down if the new release fails.
        running = previous_row is not None and state is not None and state["status"] != "stopped"
        previous = self._release_of(previous_row) if previous_row and running else None
        started = time.monotonic()
        self._append(
            [
                de.DeploymentStarted(
                    run_id=item.run_id,
                    deployment_id=deployment_id,
                    environment=name,
                    artifact=item.name,
                    digest=item.digest,
                    revision=revision,
                    actor=actor,
                    trigger=trigger,
                    strategy=STRATEGY,
                    previous_digest=previous_row["digest"] if previous_row else None,
                    previous_deployment=previous_row["id"] if previous_row else None,
                    lease=fence[1],
                    hotfix=hotfix,
                    overridden=overridden,
                    started_epoch=self.now(),
                    policy_digest=policy_digest(environment),
                    policy_branches=list(environment.branches),
                )
            ],
            fence=fence,
        )
        self.say(
            f"deploying {item.name} {item.digest[:19]}… to {name} (deployment {deployment_id})"
        )

        def renew() -> None:
            if not self.record.renew_lease(name, fence[1], self._ttl(environment), self.now()):
                raise LeaseLost(f"the lease on environment '{name}' was taken over")

        renew()
        steps = _Steps(previous="running" if previous is not None else "none")
        try:
            status, reason, running, health = self._recreate(
                environment, release, previous, renew, steps
            )
        except LeaseLost:
            # Another deployer holds the environment now: nothing more may be written, but
            # the release this one started does not stay behind untracked.
            if steps.new != "not started":
                with contextlib.suppress(ConveyorError, OSError):
                    self.make_target(environment, release).stop(release)
            raise
        except BaseException as exc:
            # Whatever went wrong (a cancel included), the new release does not outlive the
            # deployment, and the deployment does not stay "running" on the record.
            if isinstance(exc, DeployCancelled | KeyboardInterrupt):
                status, reason = "interrupted", "cancelled (Ctrl-C or SIGTERM) before the end"
                if isinstance(exc, DeployCancelled) and exc.message != CANCELLED:
                    reason += f": {exc.message}"
            else:
                detail = (
                    exc.message
                    if isinstance(exc, ConveyorError)
                    else f"{type(exc).__name__}: {exc}"
                )
                status, reason = "failed", f"the deployment stopped: {detail}"
            if steps.unhealthy:
                reason += f"; release {deployment_id} was unhealthy: {steps.unhealthy}"
            fate, running_now, uncertain = self._after_break(
                environment, release, previous, steps, renew
            )
            reason += "; " + fate
            self._append(
                [
                    de.DeploymentFinished(
                        run_id=item.run_id,
                        deployment_id=deployment_id,
                        environment=name,
                        status=status,
                        reason=reason,
                        health="",
                        duration_s=round(time.monotonic() - started, 3),
                        running_deployment=running_now,
                        finished_epoch=self.now(),
                        running_uncertain=uncertain,
                    )
                ],
                fence=fence,
            )
            self._prune_releases(name)
            summary = f"deployment {deployment_id} to {name}: {status} ({reason})"
            if isinstance(exc, DeployCancelled):
                cancelled = DeployCancelled(summary)
                cancelled.deployment_id = deployment_id
                raise cancelled from exc
            self.say(summary)
            if isinstance(exc, ConveyorError):
                exc.deployment_id = deployment_id
            raise
        shipped: list[list[Any]] = []
        if status == "succeeded" and self.commits is not None:
            try:
                earlier = self.record.successful_revisions(name, limit=50)
                shipped = [[sha, when] for sha, when in self.commits(revision, earlier)]
            except ConveyorError as exc:
                self.say(f"the commits of this deployment are not recorded: {exc.message}")
        self._append(
            [
                de.DeploymentFinished(
                    run_id=item.run_id,
                    deployment_id=deployment_id,
                    environment=name,
                    status=status,
                    reason=reason,
                    health=health.detail,
                    duration_s=round(time.monotonic() - started, 3),
                    running_deployment=running,
                    finished_epoch=self.now(),
                    commits=shipped,
                    running_uncertain=steps.uncertain,
                )
            ],
            fence=fence,
        )
        self.say(
            f"deployment {deployment_id} to {name}: {status}" + (f" ({reason})" if reason else "")
        )
        self._prune_releases(name)
        return Outcome(deployment_id, status, reason, health.detail, cancelled=steps.cut_short)

    def _refuse_if_cancelled(self) -> None:
        """Before anything changed: stop with nothing recorded but the gates' verdicts."""
        if self.cancelled():
            raise DeployCancelled(NOTHING_CHANGED)

    def _stop_if_cancelled(self) -> None:
        if self.cancelled():
            raise DeployCancelled(CANCELLED)

    def _after_break(
        self,
        environment: EnvironmentSpec,
        release: Release,
        previous: Release | None,
        steps: _Steps,
        renew: Callable[[], None] = lambda: None,
    ) -> tuple[str, int | None, bool]:
        """Stop the new release of a deployment that broke off. What became of it and of the
        release it replaced; the deployment whose release runs (or may run); whether that is
        uncertain."""
        name = f"release {release.deployment_id}"
        if steps.new != "not started":
            try:
                target = self.make_target(environment, release)
                target.stop(release)
            except (ConveyorError, OSError) as exc:
                self.say(f"{name} could not be stopped: {exc}")
                return f"{name} could not be stopped and may run", release.deployment_id, True
            if not target.stops_releases:
                # The user's scripts own the service: a deploy script that ran, even partway,
                # may have replaced what ran before.
                done = steps.new == "in place"
                last = (
                    release.deployment_id
                    if done
                    else (previous.deployment_id if previous is not None else None)
                )
                return (
                    f"what runs in {environment.name} now is not known (its scripts own it, and"
                    f" the deploy script of {name} ran{'' if done else ', maybe partway'}):"
                    " promote the release you want there",
                    last,
                    True,
                )
        fate = f"{name} " + ("was not started" if steps.new == "not started" else "stopped")
        if previous is None:
            return fate, None, False
        if steps.previous == "stopped" and not steps.restart_tried:
            # What ran before comes back (unchecked), as when a cancel comes before the new
            # release starts: a deployment that broke off does not leave the environment down.
            renew()  # a deployer that lost the lease starts nothing (LeaseLost)
            target = self.make_target(environment, previous)
            problem = self._start_again(target, previous, release, steps)
            if problem:
                self.say(
                    f"deployment {previous.deployment_id} could not be started again: {problem}"
                )
        fate += "; " + _previous_after_break(previous.deployment_id, steps.previous)
        if steps.previous in ("running", "restarted", "unknown"):
            return fate, previous.deployment_id, steps.previous == "unknown"
        return fate, None, False

    def _restart_replaced(
        self, target: Target, previous: Release, release: Release, steps: _Steps
    ) -> None:
        """Cancelled once the release it replaces was stopped and before the new one started:
        start that one again (unchecked), so that the cancel leaves what ran; then stop."""
        problem = self._start_again(target, previous, release, steps)
        if problem:
            raise DeployCancelled(
                f"{CANCELLED}; deployment {previous.deployment_id} could not be started again:"
                f" {problem}"
            )
        raise DeployCancelled(CANCELLED)

    def _start_again(
        self, target: Target, previous: Release, release: Release, steps: _Steps
    ) -> str:
        """Start the replaced release again, unchecked (its process must at least be there);
        why it is not running (``""``: it is, and ``steps.previous`` says so)."""
        steps.restart_tried = True
        try:
            target.restore(previous, release)
            running = target.describe(previous).get("running")
        except (ConveyorError, OSError) as exc:
            return exc.message if isinstance(exc, ConveyorError) else str(exc)
        if running is False:
            with contextlib.suppress(ConveyorError, OSError):
                target.stop(previous)
            return "its process ended at once"
        steps.previous = "restarted"
        return ""

    def _recreate(
        self,
        environment: EnvironmentSpec,
        release: Release,
        previous: Release | None,
        renew: Callable[[], None] = lambda: None,
        steps: _Steps | None = None,
    ) -> tuple[str, str, int | None, Health]:
        """Stop the old release, start the new one; roll back if it is not healthy."""
        steps = steps if steps is not None else _Steps()
        self._stop_if_cancelled()
        new_target = self.make_target(environment, release)
        if previous is not None:
            replaced = self.make_target(environment, previous)
            self._stop_if_cancelled()
            replaced.stop(previous)
            if replaced.stops_releases:
                steps.previous = "stopped"
            renew()
            if self.cancelled() and steps.previous == "stopped":
                self._restart_replaced(replaced, previous, release, steps)
        self._stop_if_cancelled()
        try:
            steps.new = "started"
            if previous is not None and steps.previous == "running":
                steps.previous = "unknown"  # the user's deploy script replaces it
            try:
                new_target.start(release, previous)
            except NotStarted:
                steps.new = "not started"
                steps.previous = "running" if steps.previous == "unknown" else steps.previous
                raise
            steps.new = "in place"
            renew()
            self._stop_if_cancelled()
            health = new_target.check(release, environment.health_timeout_s, self.cancelled)
        except ConveyorError as exc:
            if isinstance(exc, LeaseLost | DeployCancelled):
                raise
            health = Health(False, exc.message)
        if health.cut_short:
            raise DeployCancelled(CANCELLED)
        # A verdict that came in stands, cancel or not: success, or the rollback (the recovery).
        renew()
        if health.ok:
            return "succeeded", "", release.deployment_id, health
        self.say(f"release {release.deployment_id} is not healthy: {health.detail}")
        steps.unhealthy = health.detail
        new_target.stop(release)
        steps.new = "stopped"
        if previous is None:
            return "failed", f"unhealthy: {health.detail}", None, health
        # The rollback is the recovery: a cancel does not skip it, it cuts its check short.
        self.say(f"rolling back to deployment {previous.deployment_id}")
        renew()
        old_target = self.make_target(environment, previous)
        try:
            steps.previous = "unknown"
            old_target.restore(previous, release)
            steps.previous = "running"  # it may answer from the moment it is restored
            renew()
            restored = old_target.check(previous, environment.health_timeout_s, self.cancelled)
        except ConveyorError as exc:
            if isinstance(exc, LeaseLost | DeployCancelled):
                raise
            restored = Health(False, exc.message)
        if restored.ok:
            return (
                "rolled_back",
                f"unhealthy: {health.detail}; deployment {previous.deployment_id} runs again",
                previous.deployment_id,
                health,
            )
        if restored.cut_short:
            # Restored, but the cancel cut its check short: left running, health unproven.
            steps.cut_short = True
            try:
                running = old_target.describe(previous).get("running")
            except (ConveyorError, OSError):
                running = None
            if running is not False:
                steps.uncertain = running is None
                return (
                    "interrupted",
                    f"unhealthy: {health.detail}; {CANCELLED} while deployment"
                    f" {previous.deployment_id}, restored, was checked: "
                    + ("it runs" if running else "it may run")
                    + ", its health is not known",
                    previous.deployment_id,
                    health,
                )
            restored = Health(False, "its process is not running")
        # The scripts own the service: after a failed rollback script, what runs is not known
        # (the release it tried to restore stays the last one known to have run). A restored
        # process that failed its check is stopped, as a new release that failed it is: the
        # record says nothing runs, and nothing does.
        steps.uncertain = not old_target.stops_releases
        if old_target.stops_releases:
            with contextlib.suppress(ConveyorError, OSError):
                old_target.stop(previous)
        return (
            "failed",
            f"unhealthy: {health.detail}; the rollback to deployment {previous.deployment_id}"
            f" failed too: {restored.detail}",
            previous.deployment_id if steps.uncertain else None,
            health,
        )

    def recover_interrupted(
        self, environment: EnvironmentSpec, fence: tuple[str, int], restart: bool = True
    ) -> int:
        """Record the deployments a dead deployer left unfinished, and stop their release;
        how many there were.

        A release the dead deployer had stopped (it stops the old release, then starts the new
        one) is started again and checked, unless ``restart`` is false (``env stop``): the
        environment gets back what ran, and the next deployment something to roll back to.
        Only for targets whose releases Conveyor stops (``process``): a ``command`` target's
        scripts own the service, and what runs there is not known.
        """
        rows = self.record.unfinished_deployments(environment.name)
        for row in rows:
            release = self._release_of(row)
            # Its folder may be gone; what runs is known by the target's state, not the folder.
            # (A command target's stop does nothing: not even its checkout is needed.)
            if environment.target.type != "command":
                with contextlib.suppress(ConveyorError, OSError):
                    self.make_target(environment, release).stop(release)
            state = self.record.environment_state(environment.name)
            # A dead deployer's script may have replaced what ran (scripts own the service).
            uncertain = environment.target.type == "command" or bool(
                state and state["status"] == "unknown"
            )
            running_id = state["deployment"] if state else None
            checkable = state is not None and state["status"] == "running" and not uncertain
            reason = "its deployer stopped before the end (its lease was taken over)"
            # The dead deployer may have stopped it already (it stops, then starts).
            if (
                running_id is not None
                and checkable
                and self._runs(environment, running_id) is False
            ):
                stopped, running_id = running_id, None
                if not restart:
                    reason += f"; deployment {stopped} no longer ran"
                else:
                    runs, fate, unsure = self._start_stopped(environment, stopped, release)
                    running_id = stopped if runs else None
                    uncertain = uncertain or unsure
                    reason += f"; deployment {stopped}, which no longer ran, {fate}"
                    self.say(f"deployment {stopped} {fate}")
            self._append(
                [
                    de.DeploymentFinished(
                        run_id=row["run"],
                        deployment_id=row["id"],
                        environment=environment.name,
                        status="interrupted",
                        reason=reason,
                        health="",
                        duration_s=0.0,
                        running_deployment=running_id,
                        running_uncertain=uncertain,
                    )
                ],
                fence=fence,
            )
            self.say(f"deployment {row['id']} to {environment.name} was interrupted; recorded")
        return len(rows)

    def _start_stopped(
        self, environment: EnvironmentSpec, deployment_id: int, interrupted: Release
    ) -> tuple[bool, str, bool]:
        """Start again, and check, the release a dead deployer had stopped: whether it runs,
        what became of it (for the record), and whether its running is not known."""
        row = self.record.deployment(deployment_id)
        if row is None:
            return False, "could not be started again: it is not on the record", False
        release = self._release_of(row)
        if not Path(release.folder).is_dir():
            return False, f"could not be started again: its folder {release.folder} is gone", False
        self.say(
            f"starting deployment {deployment_id} again: deployment {interrupted.deployment_id},"
            " which replaced it, stopped before the end"
        )
        target = self.make_target(environment, release)
        try:
            target.restore(release, interrupted)
            health = target.check(release, environment.health_timeout_s, self.cancelled)
        except ConveyorError as exc:
            if isinstance(exc, LeaseLost):
                raise
            health = Health(False, exc.message)
        if health.ok:
            return True, "was started again and is healthy", False
        if health.cut_short:  # as a rollback's: left running, its health not known
            try:
                running = target.describe(release).get("running")
            except (ConveyorError, OSError):
                running = None
            if running is not False:
                return (
                    True,
                    "was started again; a cancel (Ctrl-C or SIGTERM) cut its health check short:"
                    + (" it runs" if running else " it may run")
                    + ", its health is not known",
                    running is None,
                )
            health = Health(False, "its process is not running")
        with contextlib.suppress(ConveyorError, OSError):
            target.stop(release)
        return False, f"could not be started again: {health.detail}", False

    def _runs(self, environment: EnvironmentSpec, deployment_id: int) -> bool | None:
        """Whether the release of a deployment runs now (``None``: not known)."""
        row = self.record.deployment(deployment_id)
        if row is None:
            return None
        release = self._release_of(row)
        try:
            running = self.make_target(environment, release).describe(release).get("running")
        except (ConveyorError, OSError):
            return None
        return running if isinstance(running, bool) else None

    # -- releases ----------------------------------------------------------------------------

    def _prune_releases(self, environment: str) -> None:
        """Delete the release folders and checkouts of all but the ``KEEP_RELEASES`` newest
        deployments of ``environment``, except the one that runs (or last ran) there. Called
        under the environment's lease, once a deployment is recorded."""
        try:
            state = self.record.environment_state(environment)
        except ConveyorError:
            return  # what runs is not known: delete nothing
        if state is not None and state["status"] == "unknown":
            return  # a user's script may serve from a later release's folder: keep them all
        running = state["deployment"] if state else None
        base = self.environments_dir / environment
        for part in ("releases", "checkouts"):
            try:
                entries = list((base / part).iterdir())
            except OSError:
                continue
            ids = sorted(
                {
                    stem
                    for stem in (_stem(e.name) for e in entries if e.is_dir())
                    if stem is not None
                },
                reverse=True,
            )
            doomed = set(ids[KEEP_RELEASES:]) - {running}
            unwanted = [entry for entry in entries if _stem(entry.name) in doomed]
            # Moved aside now (within the folder: on its disk), deleted by a detached rm: the
            # lease is not held while gigabytes of old releases are deleted (the first
            # deployment after an upgrade had them all).
            trash = base / part / TRASH
            if unwanted or trash.is_dir():
                discard(unwanted, trash)

    def _folder(self, environment: str, deployment_id: int) -> Path:
        return self.environments_dir / environment / "releases" / str(deployment_id)

    def _prepare(
        self, environment: EnvironmentSpec, item: ArtifactRecord, deployment_id: int, revision: str
    ) -> Release:
        """Unpack the verified artifact into a new release folder (hostile archives refused)."""
        from conveyor.adapters.artifacts import is_tar, safe_extract

        folder = self._folder(environment.name, deployment_id)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            if item.kind == "dir":
                self.store.export(item.digest, "dir", str(folder))
                artifact_path = folder
            else:
                blob = self.store.path_of(item.digest)
                # By its name, as documented: sniffing the bytes took an image that starts
                # with zeros for an empty tar (and read gigabytes to decide).
                if item.path.lower().endswith(TAR_SUFFIXES):
                    if not is_tar(blob):
                        raise ConveyorError(
                            f"{item.path} is named as a tar archive but is not one",
                            hint="build a real archive, or give the artifact another name",
                        )
                    safe_extract(blob, folder)
                    artifact_path = folder
                else:
                    folder.mkdir()
                    artifact_path = folder / item.path.rsplit("/", 1)[-1]
                    self.store.export(item.digest, "file", str(artifact_path))
        except ConveyorError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise refusal(
                f"{item.name} ({item.digest[:19]}…) cannot be unpacked: {exc.message}",
                hint=exc.hint,
            ) from exc
        folder.with_suffix(".path").write_text(str(artifact_path))
        return Release(
            environment=environment.name,
            deployment_id=deployment_id,
            artifact=item.name,
            digest=item.digest,
            folder=str(folder),
            artifact_path=str(artifact_path),
            revision=revision,
        )

    def _release_of(self, row: dict[str, Any]) -> Release:
        folder = self._folder(row["environment"], row["id"])
        try:
            artifact_path = Path(folder.with_suffix(".path").read_text())
        except OSError:
            artifact_path = folder
        return Release(
            environment=row["environment"],
            deployment_id=row["id"],
            artifact=row["artifact"],
            digest=row["digest"],
            folder=str(folder),
            artifact_path=str(artifact_path),
            revision=row["revision"],
        )


def _stem(name: str) -> int | None:
    """The deployment id a release folder's entry belongs to (``12``, ``12.path``; not
    ``012``), if any."""
    stem = name.removesuffix(".path")
    if not (stem.isascii() and stem.isdigit()) or str(int(stem)) != stem:
        return None
    return int(stem)


def policy_digest(environment: EnvironmentSpec) -> str:
    """The digest of an environment's definition (target, policy, gates), not of its place
    in the file."""
    spec = dataclasses.asdict(environment)
    spec.pop("location", None)
    _drop_locations(spec)
    return "sha256:" + hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def _drop_locations(value: Any) -> None:
    if isinstance(value, dict):
        value.pop("location", None)
        for item in value.values():
            _drop_locations(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _drop_locations(item)


def policy_problems(
    record: Any, environment: EnvironmentSpec, item: ArtifactRecord
) -> list[tuple[str, str]]:
    """Why ``environment`` must not accept ``item`` (besides verification): ``(why, hint)``."""
    facts = record.run_facts(item.run_id)
    if facts is None:
        return [(f"the run {item.run_id} that built {item.name} is not in the record", "")]
    problems: list[tuple[str, str]] = []
    in_force = record.policy_in_force(environment.name)
    if in_force is not None and in_force["digest"] != policy_digest(environment):
        accepted = in_force["branches"]
        branch = facts["branch"]
        if accepted and (
            facts["dirty"] or not any(fnmatch.fnmatchcase(branch, p) for p in accepted)
        ):
            shown = f"branch '{branch}'" if branch else "a revision that is not a branch"
            return [
                (
                    f"environment '{environment.name}' is defined differently here than when"
                    f" deployment {in_force['deployment']} was made; its policy in force accepts"
                    f" builds of {', '.join(accepted)}, and {item.name}@{item.run_id} was built"
                    f" from {shown}",
                    "a change to an environment's policy takes effect only with a build of a"
                    " branch the policy in force accepts: merge it there, run, and deploy that",
                )
            ]
    if (environment.branches or environment.requires) and facts["dirty"]:
        problems.append(
            (
                f"{item.name}@{item.run_id} was built from a dirty working tree; environment"
                f" '{environment.name}' accepts only committed builds",
                "commit, run the pipeline, and promote that run's artifact",
            )
        )
    if environment.branches:
        branch = facts["branch"]
        if not any(fnmatch.fnmatchcase(branch, p) for p in environment.branches):
            shown = f"branch '{branch}'" if branch else "a revision that is not a branch"
            problems.append(
                (
                    f"{item.name}@{item.run_id} was built from {shown}; environment"
                    f" '{environment.name}' accepts builds of {', '.join(environment.branches)}",
                    "build it on an accepted branch (e.g. merge, then run the pipeline)",
                )
            )
    missing = _missing_stages(record, environment, item)
    if missing:
        problems.append(
            (
                f"{item.name} ({item.digest[:19]}…) has not passed stage"
                f"{'s' if len(missing) > 1 else ''} {', '.join(repr(s) for s in missing)},"
                f" which environment '{environment.name}' requires"
                + (
                    f", in a committed build of {', '.join(environment.branches)}"
                    if environment.branches
                    else " (in a committed build)"
                ),
                "promote an artifact of a run in which those stages succeeded"
                + (" on an accepted branch" if environment.branches else ""),
            )
        )
    return problems


def _missing_stages(record: Any, environment: EnvironmentSpec, item: ArtifactRecord) -> list[str]:
    """The required stages that no run publishing ``item``'s bytes passed (the fewest).

    Only a run that counts for this environment counts: committed (not ``--dirty``) and, if
    the environment names branches, built from one of them. A stage passed in a dirty run, or
    on a branch whose tests were disabled, proves nothing.
    """
    if not environment.requires:
        return []
    best: list[str] | None = None
    for run_id in record.artifact_runs(item.digest):
        facts = record.run_facts(run_id) or {"stages": {}, "dirty": True, "branch": ""}
        if facts.get("dirty"):
            continue
        if environment.branches and not any(
            fnmatch.fnmatchcase(facts.get("branch") or "", p) for p in environment.branches
        ):
            continue
        missing = [s for s in environment.requires if facts["stages"].get(s) != "succeeded"]
        if best is None or len(missing) < len(best):
            best = missing
    return list(environment.requires) if best is None else best


def take_lease(record: Any, environment: str, actor: str, ttl_s: float = 60.0) -> int:
    """The environment's lease for a short operation (``env stop``), without waiting."""
    token, holder = record.acquire_lease(
        environment,
        f"{actor} (pid {os.getpid()})",
        pid=os.getpid(),
        host=socket.gethostname(),
        ttl_s=ttl_s,
        now=time.time(),
        holder_gone=_holder_gone,
    )
    if token is None:
        raise DeployError(
            f"environment '{environment}' is being deployed by {holder['holder']}"
            f" on {holder['host']} (lease expires in {holder['expires_in_s']} s)",
            hint="try again when the deployment has ended",
        )
    return int(token)


def unfinished_deployments(
    record: Any, environment: str, now: float | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deployments recorded as started and not finished: (in progress, interrupted).

    One is in progress while its deployer, alive, holds the environment's lease; the others'
    deployers stopped before the end (killed, crashed): what they left runs until ``env stop``
    or the next deployment, which record them ``interrupted``.
    """
    rows = record.unfinished_deployments(environment)
    if not rows:
        return [], []
    lease = record.lease_of(environment)
    live_token = None
    if (
        lease is not None
        and not lease["released"]
        and lease["expires_at"] > (time.time() if now is None else now)
        and not _holder_gone(lease["pid"], lease["host"])
    ):
        live_token = lease["token"]
    running = [row for row in rows if live_token is not None and row["lease"] == live_token]
    return running, [row for row in rows if row not in running]


def _holder_gone(pid: int | None, host: str | None) -> bool:
    """Whether a lease holder on this machine no longer runs (it crashed)."""
    if pid is None or host != socket.gethostname():
        return False
    return not os.path.exists(f"/proc/{pid}")


__all__ = ["STRATEGY", "Deployer", "LeaseLost", "Outcome", "refusal", "unfinished_deployments"]
