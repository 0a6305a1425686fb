"""The delivery part of a pipeline definition: environments, their targets and gates, and
deploy stages, as typed, immutable values.

Kept apart from :mod:`conveyor.spec.models` so that a run of a pipeline without environments
does not build these classes (start-up time).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from conveyor.spec.models import Location

TARGET_TYPES = ("process", "command")
ROLE_NAME = r"[a-z][a-z0-9_-]{0,39}"
"""What a role may be called: in ``override_roles``, an approval gate's ``role`` and
``conveyor users add --role`` alike (a role no user can hold would fail its gate for ever)."""
ROLE_HINT = "lower-case letters, digits, '_' and '-', starting with a letter (at most 40)"
DEFAULT_HEALTH_TIMEOUT_S = 60.0
DEFAULT_LOG_MAX_BYTES = 50 * 1024 * 1024
"""A release's log file is rotated when it would grow past this (``logs: {max_size}``)."""
DEFAULT_LOG_FILES = 2
"""Log files kept per release, the newest included (``logs: {files}``)."""


@dataclass(frozen=True)
class TargetSpec:
    """How an environment is deployed to.

    ``process``: ``command`` runs the release as a local service; health by ``health_http``
    (a path on ``$PORT``) or ``health_command``. ``command``: the user's ``deploy``, ``health``
    and ``rollback`` scripts.
    """

    type: str
    command: str = ""
    health_http: str | None = None
    health_command: str | None = None
    deploy: str = ""
    rollback: str | None = None


GATE_KINDS = ("tests", "coverage", "metric", "approval", "window")
STAGE_GATE_KINDS = ("tests", "coverage", "metric", "window")
DEFAULT_OVERRIDE_ROLES = ("overrider", "admin")
DEFAULT_OVERRIDE_EXPIRY_S = 2 * 3600.0
DEFAULT_OVERRIDE_MAX_S = 24 * 3600.0


@dataclass(frozen=True)
class GateSpec:
    """An automated check before a stage or a deployment; ``params`` are the kind's settings
    (validated, JSON values), e.g. ``{"min_passed_ratio": 1.0, "min_count": 50}``."""

    name: str
    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)
    location: Location = Location(1, 1)


@dataclass(frozen=True)
class EnvironmentSpec:
    """A place the software runs, with its target and the policy for what it accepts."""

    name: str
    target: TargetSpec
    requires: tuple[str, ...] = ()
    """Stages that must have passed in the run that built the artifact."""
    branches: tuple[str, ...] = ()
    """Glob patterns of the branches whose builds it accepts (empty: any)."""
    port: int | None = None
    health_timeout_s: float = DEFAULT_HEALTH_TIMEOUT_S
    gates: tuple[GateSpec, ...] = ()
    override_roles: tuple[str, ...] = DEFAULT_OVERRIDE_ROLES
    override_expiry_s: float = DEFAULT_OVERRIDE_EXPIRY_S
    """The expiry of an override when ``--expires`` is not given."""
    override_max_s: float = DEFAULT_OVERRIDE_MAX_S
    override_confirm: bool = False
    """Whether an override needs a second person's ``--confirm``."""
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    log_files: int = DEFAULT_LOG_FILES
    location: Location = Location(1, 1)


@dataclass(frozen=True)
class DeploySpec:
    """A deploy stage: put ``artifact`` (built earlier in the run) into ``environment``."""

    environment: str
    artifact: str
    location: Location = Location(1, 1)


def gate_from_dict(data: dict[str, Any]) -> GateSpec:
    """A gate as ``PipelineSpec.to_dict`` wrote it."""
    return GateSpec(data["name"], data["kind"], dict(data["params"]), Location(**data["location"]))


def deploy_from_dict(data: dict[str, Any]) -> DeploySpec:
    """A deploy stage's settings as ``PipelineSpec.to_dict`` wrote them."""
    return DeploySpec(**{**data, "location": Location(**data["location"])})


def environment_from_dict(data: dict[str, Any]) -> EnvironmentSpec:
    """An environment as ``PipelineSpec.to_dict`` wrote it."""
    return EnvironmentSpec(
        **{
            **data,
            "target": TargetSpec(**data["target"]),
            "requires": tuple(data["requires"]),
            "branches": tuple(data["branches"]),
            "gates": tuple(gate_from_dict(g) for g in data["gates"]),
            "override_roles": tuple(data["override_roles"]),
            "location": Location(**data["location"]),
        }
    )
