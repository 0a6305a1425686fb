"""Build provenance: in-toto Statement v1 with a SLSA v1.0 provenance predicate (pure).

A job that publishes an artifact gets a *statement* saying which builder made it, from which
revision, pipeline file, stage, job and parameters, and from which input artifacts. The adapter
(``conveyor.adapters.signing``) signs its bytes in a DSSE envelope; this module only builds,
serialises and reads statements, and computes DSSE's pre-authentication encoding. Standard library
only: no I/O, no cryptography.

Shape (field names as in https://slsa.dev/spec/v1.0/provenance and the in-toto Statement v1)::

    {"_type": STATEMENT_TYPE,
     "subject": [{"name": artifact, "digest": {"sha256": hex}}],
     "predicateType": PREDICATE_TYPE,
     "predicate": {
       "buildDefinition": {
         "buildType": BUILD_TYPE,
         "externalParameters": {"repository", "revision", "pipeline": {"path", "digest"},
                                "stage", "job", "parameters"},
         "internalParameters": {...},
         "resolvedDependencies": [{"uri": repository, "digest": {"gitCommit": revision}},
                                  {"name": input, "digest": {"sha256": hex}}, ...]},
       "runDetails": {
         "builder": {"id": builder_id, "version": {"conveyor": version}},
         "metadata": {"invocationId": run id, "startedOn": ts, "finishedOn": ts}}}}

``BUILD_TYPE`` (``https://conveyor.dev/buildtypes/job/v1``) names this template: one job of a
Conveyor pipeline run on a git revision. ``externalParameters`` are what the user controls (the
repository and revision, the pipeline file and its digest, the stage and job names, and the job's
parameters, never secret values); ``internalParameters`` are set by the builder and may be empty;
``resolvedDependencies`` are the revision's commit and every artifact the job consumed, inputs
sorted by name so equal builds give equal bytes. ``invocationId`` is the run id, unique per
builder; the builder id names one Conveyor instance by its signing key (``builder_id_for``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://conveyor.dev/buildtypes/job/v1"
"""One job of a Conveyor pipeline run on a git revision (see the module docstring)."""
BUILDER_ID_PREFIX = "https://conveyor.dev/builders/ed25519/"
"""A builder id is this prefix and the hex sha256 of the instance's public key (DER SPKI)."""

_SHA256_HEX = re.compile(r"[0-9a-f]{64}\Z")
_GIT_COMMIT = re.compile(r"(?:[0-9a-f]{40}|[0-9a-f]{64})\Z")
_UTC_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?Z\Z", re.ASCII)


def builder_id_for(keyid: str) -> str:
    """The builder id of the Conveyor instance whose signing key has id ``keyid``.

    It is stable for as long as the key is, and a verifier that pins the key can check that the
    statement names the same builder.
    """
    if not _SHA256_HEX.match(keyid):
        raise ValueError(f"key id must be 64 lowercase hex digits, not {keyid!r}")
    return BUILDER_ID_PREFIX + keyid


def _sha256_hex(digest: object, what: str) -> str:
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise ValueError(f"{what} must be 'sha256:<hex>', not {digest!r}")
    hexdigest = digest.removeprefix("sha256:")
    if not _SHA256_HEX.match(hexdigest):
        raise ValueError(f"{what} must be 'sha256:' and 64 lowercase hex digits, not {digest!r}")
    return hexdigest


def _timestamp(value: str, what: str) -> str:
    """Check an in-toto Timestamp: RFC 3339 in UTC, with a ``Z`` suffix."""
    problem = f"{what} must be an RFC 3339 UTC timestamp such as 2026-01-31T12:00:00Z"
    if not isinstance(value, str) or not _UTC_TIMESTAMP.match(value):
        raise ValueError(f"{problem}, not {value!r}")
    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")  # real dates and times only
    except ValueError:
        raise ValueError(f"{problem}, not {value!r}") from None
    return value


def _json_copy(value: object, what: str) -> Any:
    """A deep copy of ``value`` made of JSON values only (so the statement can be serialised)."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be plain JSON values: {exc}") from None


def build_statement(
    *,
    name: str,
    digest: str,
    builder_id: str,
    repository: str,
    revision: str,
    pipeline_file: str,
    pipeline_digest: str,
    stage: str,
    job: str,
    parameters: Mapping[str, Any],
    dependencies: Sequence[Mapping[str, Any]],
    run_id: int,
    started_at: str,
    finished_at: str,
    conveyor_version: str,
    internal_parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The provenance statement of artifact ``name`` (``digest`` is ``sha256:<hex>``).

    Args:
        builder_id: the instance's id, see ``builder_id_for``.
        repository: a URI of the source repository (e.g. ``git+https://host/org/repo``).
        revision: the git commit id (40 or 64 lowercase hex digits) the job ran on.
        pipeline_file: the pipeline file's path in the repository.
        pipeline_digest: ``sha256:<hex>`` of the pipeline file's bytes.
        parameters: the job's user-controlled parameters; never secret values.
        dependencies: the artifacts the job consumed, each ``{"name": str, "digest":
            "sha256:<hex>"}`` (other keys are ignored).
        run_id: the run's id, recorded as ``invocationId``.
        started_at, finished_at: RFC 3339 UTC timestamps (``...Z``) of the job.
        internal_parameters: builder-controlled values worth recording; none by default.

    Raises:
        ValueError: an argument is malformed (a digest, the revision, a timestamp, non-JSON
            parameters).
    """
    for what, value in (("name", name), ("builder_id", builder_id), ("repository", repository)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must be a non-empty string")
    if not isinstance(revision, str) or not _GIT_COMMIT.match(revision):
        raise ValueError(f"revision must be a full git commit id (lowercase hex), not {revision!r}")
    inputs: list[dict[str, Any]] = []
    for i, dep in enumerate(dependencies):
        dep_name = dep.get("name")
        if not isinstance(dep_name, str) or not dep_name:
            raise ValueError(f"dependency {i} needs a non-empty 'name'")
        dep_digest = _sha256_hex(dep.get("digest"), f"the digest of dependency {dep_name!r}")
        inputs.append({"name": dep_name, "digest": {"sha256": dep_digest}})
    inputs.sort(key=lambda d: (d["name"], d["digest"]["sha256"]))
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": _sha256_hex(digest, "digest")}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "repository": repository,
                    "revision": revision,
                    "pipeline": {
                        "path": pipeline_file,
                        "digest": {"sha256": _sha256_hex(pipeline_digest, "pipeline_digest")},
                    },
                    "stage": stage,
                    "job": job,
                    "parameters": _json_copy(dict(parameters), "parameters"),
                },
                "internalParameters": _json_copy(
                    dict(internal_parameters or {}), "internal_parameters"
                ),
                "resolvedDependencies": [
                    {"uri": repository, "digest": {"gitCommit": revision}},
                    *inputs,
                ],
            },
            "runDetails": {
                "builder": {"id": builder_id, "version": {"conveyor": conveyor_version}},
                "metadata": {
                    "invocationId": str(run_id),
                    "startedOn": _timestamp(started_at, "started_at"),
                    "finishedOn": _timestamp(finished_at, "finished_at"),
                },
            },
        },
    }


def statement_bytes(statement: Mapping[str, Any]) -> bytes:
    """The canonical serialisation: sorted keys, no spaces, UTF-8, no NaN or infinities.

    Signatures cover these exact bytes (DSSE signs bytes, not JSON), so canonical form only
    makes equal statements byte-identical; verifiers never re-serialise.
    """
    text = json.dumps(
        statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding of ``payload`` with ``payload_type``: what is signed.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, lengths in bytes as ASCII decimal.
    """
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_strict(data: bytes | str) -> Any:
    """Parse untrusted JSON strictly: UTF-8, no duplicate keys, no NaN or infinities.

    Duplicate keys are refused because two readers may keep different values of the same key.

    Raises:
        ValueError: with the reason, for any malformed input.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None


def _get(value: object, *path: str | int) -> Any:
    """``value[p0][p1]...``, or ValueError naming the first missing or mistyped step."""
    where = "statement"
    for step in path:
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                raise ValueError(f"{where} is not a list with an item {step}")
            value = value[step]
        else:
            if not isinstance(value, Mapping) or step not in value:
                raise ValueError(f"{where} has no field {step!r}")
            value = value[step]
        where = f"{where}[{step!r}]" if isinstance(step, str) else f"{where}[{step}]"
    return value


def _get_str(value: object, *path: str | int) -> str:
    found = _get(value, *path)
    if not isinstance(found, str):
        raise ValueError(f"statement field {'.'.join(map(str, path))} is not a string")
    return found


def check_statement(statement: object) -> dict[str, Any]:
    """``statement`` if it is a SLSA v1 provenance statement this module can read.

    Checks the types, exactly one subject with a sha256 digest, and the builder id; unknown
    fields are allowed, as the specifications require.

    Raises:
        ValueError: naming the first problem.
    """
    if not isinstance(statement, dict):
        raise ValueError("the statement is not a JSON object")
    if statement.get("_type") != STATEMENT_TYPE:
        raise ValueError(f"_type is {statement.get('_type')!r}, not {STATEMENT_TYPE!r}")
    if statement.get("predicateType") != PREDICATE_TYPE:
        found = statement.get("predicateType")
        raise ValueError(f"predicateType is {found!r}, not {PREDICATE_TYPE!r}")
    subjects = _get(statement, "subject")
    if not isinstance(subjects, list) or len(subjects) != 1:
        raise ValueError("the statement must have exactly one subject")
    subject_name(statement)
    subject_digest(statement)
    _get_str(statement, "predicate", "buildDefinition", "buildType")
    builder_id(statement)
    return statement


def subject_name(statement: Mapping[str, Any]) -> str:
    """The name of the statement's (first) subject."""
    return _get_str(statement, "subject", 0, "name")


def subject_digest(statement: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the statement's (first) subject."""
    hexdigest = _get_str(statement, "subject", 0, "digest", "sha256")
    if not _SHA256_HEX.match(hexdigest):
        raise ValueError("the subject's sha256 digest is not 64 lowercase hex digits")
    return "sha256:" + hexdigest


def builder_id(statement: Mapping[str, Any]) -> str:
    """``predicate.runDetails.builder.id``."""
    return _get_str(statement, "predicate", "runDetails", "builder", "id")


def invocation_id(statement: Mapping[str, Any]) -> str:
    """``predicate.runDetails.metadata.invocationId`` (the run id)."""
    return _get_str(statement, "predicate", "runDetails", "metadata", "invocationId")


def source_revision(statement: Mapping[str, Any]) -> str:
    """The git commit the build ran on (``externalParameters.revision``)."""
    return _get_str(statement, "predicate", "buildDefinition", "externalParameters", "revision")
