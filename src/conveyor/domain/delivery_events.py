"""Events of environments and their governance: deployments, approvals, overrides, users and
incidents (appended by ``conveyor.app`` and the CLI, not by the engine).

They are kept apart from ``conveyor.domain.events`` so that running a pipeline does not pay for
defining them (every frozen dataclass costs a fraction of a millisecond at start-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from conveyor.domain.events import Event


@dataclass(frozen=True, eq=False, repr=False)
class DeploymentStarted(Event):
    """A deployment of one artifact digest to one environment began (under the environment's
    lease, fencing token ``lease``). ``run_id`` is the run that built the artifact (a deploy
    stage's own run, or the run a promotion takes the artifact from)."""

    kind: ClassVar[str] = "deployment.started"
    deployment_id: int
    environment: str
    artifact: str
    digest: str
    revision: str
    actor: str
    trigger: str
    """``stage`` (a deploy stage of the run) or ``promote``."""
    strategy: str
    previous_digest: str | None
    previous_deployment: int | None
    lease: int
    hotfix: bool = False
    overridden: bool = False
    """Whether an override let a failed gate pass for this deployment."""
    started_epoch: float = 0.0
    policy_digest: str = ""
    """Digest of the environment's policy the deployment was checked against (its whole spec
    but its place in the file): a later change of the policy is accepted only from a build of
    a branch this policy accepts."""
    policy_branches: list[str] = field(default_factory=list)
    """The branches that policy accepts (empty: any)."""


@dataclass(frozen=True, eq=False, repr=False)
class DeploymentFinished(Event):
    """A deployment ended: ``succeeded``, ``failed`` (nothing healthy runs), ``rolled_back``
    (the previous release runs again) or ``interrupted`` (its deployer died or was cancelled)."""

    kind: ClassVar[str] = "deployment.finished"
    deployment_id: int
    environment: str
    status: str
    reason: str
    health: str
    duration_s: float
    running_deployment: int | None
    """The deployment whose release runs in the environment now (``None``: nothing)."""
    finished_epoch: float = 0.0
    commits: list[list[Any]] = field(default_factory=list)
    """For a success: the commits it shipped to the environment for the first time, as
    ``[sha, commit time (epoch seconds)]`` (lead time for changes)."""
    running_uncertain: bool = False
    """What runs is not known (a user's script was stopped partway): ``running_deployment`` is
    then the last release known to have run, and the environment's status ``unknown``."""


@dataclass(frozen=True, eq=False, repr=False)
class EnvironmentStopped(Event):
    """Someone stopped what ran in an environment (``conveyor env stop``)."""

    kind: ClassVar[str] = "environment.stopped"
    environment: str
    deployment_id: int
    actor: str


@dataclass(frozen=True, eq=False, repr=False)
class ApprovalGiven(Event):
    """Someone approved one artifact digest for one environment (``run_id``: its run)."""

    kind: ClassVar[str] = "approval.given"
    environment: str
    digest: str
    approver: str
    roles: list[str]
    comment: str


@dataclass(frozen=True, eq=False, repr=False)
class OverrideGranted(Event):
    """The escape hatch: a failed gate may pass for one digest in one environment, until
    ``expires_epoch``; with ``needs_confirmation`` only once another person confirms."""

    kind: ClassVar[str] = "override.granted"
    override_id: int
    environment: str
    gate: str
    digest: str
    actor: str
    reason: str
    created_epoch: float
    expires_epoch: float
    needs_confirmation: bool


@dataclass(frozen=True, eq=False, repr=False)
class OverrideConfirmed(Event):
    kind: ClassVar[str] = "override.confirmed"
    override_id: int
    actor: str


@dataclass(frozen=True, eq=False, repr=False)
class UserChanged(Event):
    """A user's roles were set (``run_id`` is 0: not about a run)."""

    kind: ClassVar[str] = "user.changed"
    name: str
    roles: list[str]
    actor: str


@dataclass(frozen=True, eq=False, repr=False)
class IncidentOpened(Event):
    kind: ClassVar[str] = "incident.opened"
    incident_id: int
    environment: str
    deployment_id: int | None
    title: str
    actor: str
    opened_epoch: float


@dataclass(frozen=True, eq=False, repr=False)
class IncidentResolved(Event):
    kind: ClassVar[str] = "incident.resolved"
    incident_id: int
    actor: str
    resolved_epoch: float
