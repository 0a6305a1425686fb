"""Signed checkpoints of the event log, kept off this machine (ADR 0010).

A hash chain proves that what is in the log was not altered, and the head mark beside it that
nothing was cut from its end, as long as nobody rewrites both. A checkpoint is the newest
event's sequence number and hash (and the first event's, which names the record), signed with
the instance's key in a DSSE envelope. Kept somewhere the machine cannot write, it makes a later
rewrite visible: the log must still hold that event with that hash, and since every hash covers
the one before, everything up to it is as it was when the checkpoint was made.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from conveyor.domain.canonical import canonical_json
from conveyor.domain.provenance import loads_strict
from conveyor.errors import VerificationError

CHECKPOINT_TYPE = "application/vnd.conveyor.checkpoint+json"
"""The DSSE ``payloadType`` of a checkpoint."""
CHECKPOINT_SCHEMA = "conveyor.checkpoint/v1"
MAX_CHECKPOINT_BYTES = 64 * 1024
"""A checkpoint is a few hundred bytes; larger files are refused unread."""
_HASH = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CheckpointCheck:
    """What one checkpoint says about the log: ``problem`` is empty when the log holds it."""

    source: str
    seq: int | None
    signed_at: str | None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "ok": self.ok,
            "seq": self.seq,
            "signed_at": self.signed_at,
            "problem": self.problem or None,
        }


def make_checkpoint(record: Any, key: Any, signed_at: str) -> tuple[dict[str, Any], int, str]:
    """A signed checkpoint of the record's newest event: (the envelope, its seq, its hash).

    Raises:
        VerificationError: the record has no events yet (nothing to vouch for).
    """
    head = record.log_head()
    if head is None:
        raise VerificationError(
            "the record has no events yet: there is nothing to checkpoint",
            hint="run a pipeline first",
        )
    seq, digest, first = head
    statement = {
        "_type": CHECKPOINT_SCHEMA,
        "seq": seq,
        "hash": digest,
        "first_hash": first,
        "signed_at": signed_at,
    }
    envelope = key.sign(CHECKPOINT_TYPE, canonical_json(statement).encode())
    return envelope, seq, digest


def check_checkpoint(record: Any, source: str, data: bytes, public_pem: str) -> CheckpointCheck:
    """Whether the log still holds the event a checkpoint (untrusted ``data``) vouches for."""
    from conveyor.adapters.signing import open_envelope

    if len(data) > MAX_CHECKPOINT_BYTES:
        return CheckpointCheck(
            source, None, None, f"it is larger than {MAX_CHECKPOINT_BYTES} bytes: not a checkpoint"
        )
    try:
        payload = open_envelope(data, public_pem, payload_type=CHECKPOINT_TYPE, what="checkpoint")
        statement = _statement(payload)
    except VerificationError as exc:
        return CheckpointCheck(source, None, None, exc.message)
    seq, signed_at = statement["seq"], statement["signed_at"]
    first = record.event_hash_at(1)
    if first != statement["first_hash"]:
        return CheckpointCheck(
            source,
            seq,
            signed_at,
            "event 1 is not the one it names: it is a checkpoint of another record, or the"
            " whole log was rewritten",
        )
    found = record.event_hash_at(seq)
    if found is None:
        last = record.log_head()
        end = last[0] if last else 0
        return CheckpointCheck(
            source,
            seq,
            signed_at,
            f"it vouches for event {seq}, but the log ends at event {end}: events were removed"
            " from its end since",
        )
    if found != statement["hash"]:
        return CheckpointCheck(
            source,
            seq,
            signed_at,
            f"event {seq} is not the one it vouches for: the log was rewritten since",
        )
    return CheckpointCheck(source, seq, signed_at)


def _statement(payload: bytes) -> dict[str, Any]:
    """The checked fields of a checkpoint's signed payload."""
    try:
        statement = loads_strict(payload)
    except ValueError as exc:
        raise VerificationError(f"the signed checkpoint is not valid JSON: {exc}") from None
    if not isinstance(statement, dict) or statement.get("_type") != CHECKPOINT_SCHEMA:
        raise VerificationError(f"the signed payload is not a {CHECKPOINT_SCHEMA} checkpoint")
    seq = statement.get("seq")
    if type(seq) is not int or seq < 1:
        raise VerificationError("the checkpoint's 'seq' is not a positive integer")
    for name in ("hash", "first_hash"):
        value = statement.get(name)
        if not isinstance(value, str) or not _HASH.fullmatch(value):
            raise VerificationError(f"the checkpoint's '{name}' is not a sha256 hex digest")
    if not isinstance(statement.get("signed_at"), str):
        raise VerificationError("the checkpoint's 'signed_at' is not a string")
    return statement
