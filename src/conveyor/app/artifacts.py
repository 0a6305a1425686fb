"""Finding and verifying artifacts: the checks an environment applies before it accepts one.

An artifact reference is ``NAME@RUN`` (``RUN`` a run id or ``latest``), ``sha256:<hex>`` (the
latest publication of those bytes), or ``NAME`` (the latest run that published ``NAME``).
Verification answers, check by check, whether the bytes are the ones the pipeline built and
signed: the blob re-hashes to its digest, the provenance's signature verifies with the
instance's public key, its subject is that digest, and its builder is this instance.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from conveyor.domain.delivery import ArtifactRecord
from conveyor.domain.provenance import PREDICATE_TYPE, STATEMENT_TYPE
from conveyor.errors import ConveyorError, UsageError

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")


class ArtifactQueries(Protocol):
    """What this module needs from the record."""

    def resolve_run(self, ref: str) -> int | None: ...

    def find_artifact(
        self, name: str | None, run_id: int | None, digest: str | None
    ) -> ArtifactRecord | None: ...

    def latest_artifact_named(self, name: str) -> ArtifactRecord | None: ...


class BlobChecker(Protocol):
    """What this module needs from the artifact store."""

    def has(self, digest: str) -> bool: ...

    def verify(self, digest: str) -> None: ...


def resolve(record: ArtifactQueries, ref: str) -> ArtifactRecord:
    """The artifact ``ref`` names, or a ``UsageError`` saying how to write one."""
    hint = "write NAME@RUN (e.g. app@latest or app@12), NAME, or sha256:<64 hex digits>"
    if ref.startswith("sha256:"):
        if not _DIGEST.fullmatch(ref):
            raise UsageError(f"'{ref[:80]}' is not a sha256 digest", hint=hint)
        found = record.find_artifact(None, None, ref)
        if found is None:
            raise UsageError(
                f"no run published an artifact with digest {ref}",
                hint="`conveyor artifacts list` shows the published artifacts",
            )
        return found
    name, at, run_ref = ref.partition("@")
    if not _NAME.fullmatch(name) or (at and not run_ref):
        raise UsageError(f"'{ref[:80]}' is not an artifact reference", hint=hint)
    if not run_ref:
        found = record.latest_artifact_named(name)
        if found is None:
            raise UsageError(
                f"no run published an artifact named '{name}'",
                hint="`conveyor artifacts list` shows the published artifacts",
            )
        return found
    run_id = record.resolve_run(run_ref)
    if run_id is None:
        raise UsageError(
            f"there is no run '{run_ref[:40]}'",
            hint="`conveyor runs list` shows the runs; RUN is a run id or `latest`",
        )
    found = record.find_artifact(name, run_id, None)
    if found is None:
        raise UsageError(
            f"run {run_id} published no artifact named '{name}'",
            hint=f"`conveyor artifacts list --run {run_id}` shows what it published",
        )
    return found


@dataclass
class Check:
    """One verification step and what it found."""

    name: str
    ok: bool
    detail: str


@dataclass
class Verification:
    """Every check made on one artifact; it passes only if all of them do."""

    artifact: ArtifactRecord
    checks: list[Check] = field(default_factory=list)
    statement: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        item = self.artifact
        return {
            "artifact": {"name": item.name, "digest": item.digest, "run": item.run_id},
            "verified": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def verify(
    item: ArtifactRecord,
    store: BlobChecker,
    public_pem: str,
    builder_id: str,
) -> Verification:
    """Check the blob, the signature, the subject and the builder of ``item``'s provenance."""
    from conveyor.adapters.signing import verify_envelope

    result = Verification(item)
    checks = result.checks
    try:
        if not store.has(item.digest):
            raise ConveyorError(f"the store has no blob {item.digest} (it was removed)")
        store.verify(item.digest)
        checks.append(Check("digest", True, f"the stored bytes hash to {item.digest}"))
    except ConveyorError as exc:
        checks.append(Check("digest", False, exc.message))
    try:
        statement = verify_envelope(item.provenance, public_pem)
    except ConveyorError as exc:
        checks.append(Check("signature", False, exc.message))
        return result
    result.statement = statement
    checks.append(Check("signature", True, "the provenance is signed by this instance's key"))
    subjects = statement.get("subject") if isinstance(statement, dict) else None
    hexes = [
        s.get("digest", {}).get("sha256")
        for s in (subjects if isinstance(subjects, list) else [])
        if isinstance(s, dict) and isinstance(s.get("digest"), dict)
    ]
    shape_ok = (
        statement.get("_type") == STATEMENT_TYPE
        and statement.get("predicateType") == PREDICATE_TYPE
    )
    if not shape_ok:
        checks.append(Check("statement", False, "not an in-toto v1 statement of SLSA provenance"))
    elif "sha256:" + str(hexes[0] if hexes else "") != item.digest or len(hexes) != 1:
        checks.append(
            Check(
                "subject",
                False,
                f"the provenance is about {', '.join(map(str, hexes)) or 'nothing'},"
                f" not {item.digest}",
            )
        )
    else:
        checks.append(Check("subject", True, f"the provenance names {item.digest}"))
    builder = _builder_of(statement)
    if builder == builder_id:
        checks.append(Check("builder", True, f"built by this instance ({builder_id})"))
    else:
        checks.append(
            Check("builder", False, f"built by {builder or 'an unnamed builder'}, not {builder_id}")
        )
    return result


def _builder_of(statement: dict[str, Any]) -> str | None:
    try:
        builder = statement["predicate"]["runDetails"]["builder"]["id"]
    except (KeyError, TypeError):
        return None
    return builder if isinstance(builder, str) else None


def provenance_summary(statement: dict[str, Any]) -> dict[str, Any]:
    """The facts of a provenance statement a person wants to see (revision, job, run...)."""
    try:
        definition = statement["predicate"]["buildDefinition"]["externalParameters"]
        details = statement["predicate"]["runDetails"]
        return {
            "repository": definition.get("repository"),
            "revision": definition.get("revision"),
            "pipeline": definition.get("pipeline"),
            "stage": definition.get("stage"),
            "job": definition.get("job"),
            "builder": details["builder"]["id"],
            "run": details["metadata"].get("invocationId"),
            "started": details["metadata"].get("startedOn"),
            "finished": details["metadata"].get("finishedOn"),
            "inputs": [
                d
                for d in statement["predicate"]["buildDefinition"].get("resolvedDependencies", [])
                if "name" in d
            ],
        }
    except (KeyError, TypeError, AttributeError):
        return {}


def decode_statement(envelope: str) -> dict[str, Any] | None:
    """The statement inside an envelope, without verifying it (for display only)."""
    import base64

    try:
        data = json.loads(envelope)
        statement = json.loads(base64.b64decode(data["payload"], validate=True))
    except (ValueError, KeyError, TypeError):
        return None
    return statement if isinstance(statement, dict) else None
