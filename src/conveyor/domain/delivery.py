"""The interfaces of delivery: artifacts, provenance, targets, deployments and gates.

They complement ``conveyor.domain.ports`` and are kept apart so that a pipeline without
artifacts or environments does not pay for defining them at start-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from conveyor.spec.delivery import EnvironmentSpec
from conveyor.spec.models import StageSpec


@dataclass(frozen=True)
class ArtifactRecord:
    """An artifact a job of a run published (what the record says about it)."""

    name: str
    kind: str
    digest: str
    size: int
    path: str
    provenance: str
    job: str
    run_id: int


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict as a stage sees it (``status``: passed or failed)."""

    gate: str
    kind: str
    status: str
    summary: str
    evidence: Mapping[str, Any]


class StageGates(Protocol):
    """Evaluates a stage's gates on what the run recorded so far."""

    def check(self, stage: StageSpec, run_id: int) -> list[GateResult]:
        """Every gate of ``stage``, in order."""
        ...


@dataclass(frozen=True)
class StoredBlob:
    """Bytes in the content-addressed store: ``sha256:<hex>`` and their size."""

    digest: str
    size: int


class ArtifactStore(Protocol):
    """Content-addressed artifact bytes (sha256), local by default; S3/OCI can implement it.

    ``kind`` is ``file`` (the bytes of one file) or ``dir`` (a canonical tar of a directory:
    sorted entries, normalised times, owners and modes, so equal trees have equal digests).
    Every method raises ``ArtifactError`` with a clear message for hostile or corrupt input.
    """

    def publish(self, root: str, rel_path: str, kind: str) -> StoredBlob:
        """Store the file or directory at ``rel_path`` under ``root`` (it may not leave it)."""
        ...

    def has(self, digest: str) -> bool:
        """Whether the store holds ``digest``."""
        ...

    def export(self, digest: str, kind: str, dest: str) -> None:
        """Write the verified bytes to ``dest``: the file, or the directory's contents."""
        ...


class Attestor(Protocol):
    """Signs provenance statements with this Conveyor instance's key (never given to jobs)."""

    @property
    def builder_id(self) -> str:
        """The URI naming this instance as the builder in provenance."""
        ...

    def attest(self, statement: Mapping[str, Any]) -> str:
        """The DSSE envelope (JSON text) of the signed in-toto ``statement``."""
        ...


@dataclass(frozen=True)
class Release:
    """One artifact digest made ready for an environment by a deployment.

    ``folder`` is the release folder (``environments/<env>/releases/<deployment>``): for a
    directory artifact or a tar archive it holds the unpacked contents at its root; any other
    file is placed in it as is. ``artifact_path`` is that file, or ``folder`` itself.
    """

    environment: str
    deployment_id: int
    artifact: str
    digest: str
    folder: str
    artifact_path: str
    revision: str


@dataclass(frozen=True)
class Health:
    """The verdict of a health check, with what was observed."""

    ok: bool
    detail: str
    cut_short: bool = False
    """A cancel ended the check before it knew (not a verdict that the release is unhealthy)."""


class Target(Protocol):
    """How an environment is deployed to (a local process, user scripts...).

    The deployment strategy (for now *recreate*, with automatic rollback) is in the caller;
    a target only knows how to start, check, stop and restore releases. Every method raises
    ``DeployError`` with a clear message when it cannot do its part.
    """

    stops_releases: bool
    """Whether ``stop`` really stops a release (``False`` when the user's scripts own the
    service: then what runs after a deployment broke off is not known)."""

    def start(self, release: Release, previous: Release | None) -> None:
        """Put ``release`` in place of ``previous`` (which the caller has stopped)."""
        ...

    def check(
        self, release: Release, timeout_s: float, cancelled: Callable[[], bool] = lambda: False
    ) -> Health:
        """Wait up to ``timeout_s`` for ``release`` to be healthy; stop waiting as soon as
        ``cancelled()`` says so (then ``cut_short``, unless the release was seen failing)."""
        ...

    def stop(self, release: Release) -> None:
        """Stop ``release`` if it runs (idempotent)."""
        ...

    def restore(self, previous: Release, failed: Release) -> None:
        """Bring ``previous`` back after ``failed`` proved unhealthy (and was stopped)."""
        ...

    def describe(self, release: Release) -> dict[str, Any]:
        """What runs now for ``release``: ``running`` (bool), and ``url``, ``pid`` if known."""
        ...


@dataclass(frozen=True)
class DeploymentOutcome:
    """How a deployment ended: ``succeeded``, ``failed``, ``rolled_back``, or ``interrupted``
    (a cancel cut the check of the restored release short)."""

    deployment_id: int
    status: str
    reason: str
    health: str
    cancelled: bool = False
    """A cancel cut it short (the rollback's health check): the caller stops as cancelled."""


class Deployments(Protocol):
    """Deploys verified artifacts to environments (policy, lease, strategy, record)."""

    def deploy(
        self,
        environment: EnvironmentSpec,
        item: ArtifactRecord,
        *,
        revision: str,
        actor: str,
        trigger: str,
        hotfix: bool = False,
    ) -> DeploymentOutcome:
        """Deploy ``item``; raises ``DeployError`` if a policy refuses it (nothing changed)."""
        ...
