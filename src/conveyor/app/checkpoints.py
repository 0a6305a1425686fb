"""Signed checkpoints of the event log, kept off this machine (ADR 0010).

A hash chain proves that what is in the log was not altered, and the head mark beside it that
nothing was cut from its end, as long as nobody rewrites both. A checkpoint is the newest
event's sequence number and hash (and the first event's, which names the record), signed with
the instance's key in a DSSE envelope. Kept somewhere the machine cannot write, it makes a later
rewrite visible: the log must still hold that event with that hash, and since every hash covers
the one before, everything up to it is as it was when the checkpoint was made (provided the
chain verifies up to it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from conveyor.domain.canonical import canonical_json
from conveyor.domain.provenance import loads_strict
from conveyor.errors import ConveyorError, VerificationError

CHECKPOINT_TYPE = "application/vnd.conveyor.checkpoint+json"
"""The DSSE ``payloadType`` of a checkpoint."""
CHECKPOINT_SCHEMA = "conveyor.checkpoint/v1"
MAX_CHECKPOINT_BYTES = 64 * 1024
"""A checkpoint is a few hundred bytes; larger files are refused unread."""
MAX_SEQ = 2**63 - 1
"""SQLite's largest integer: no event can have a larger sequence number."""
_HASH = re.compile(r"[0-9a-f]{64}")

OK, ALTERED, INVALID, UNREADABLE = "ok", "altered", "invalid", "unreadable"
"""What a check found: the log holds it; the log no longer does (it was altered since); it is
not a checkpoint signed by the key; its file could not be read."""


@dataclass(frozen=True)
class CheckpointCheck:
    """What one checkpoint says about the log (``problem`` is empty when it holds)."""

    source: str
    found: str
    seq: int | None = None
    signed_at: str | None = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.found == OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.source,
            "ok": self.ok,
            "found": self.found,
            "seq": self.seq,
            "signed_at": self.signed_at,
            "problem": self.problem or None,
        }


def make_checkpoint(
    record: Any, key: Any, signed_at: str, since: tuple[int, str] | None = None
) -> tuple[dict[str, Any], int, str]:
    """A signed checkpoint of the record's newest event: (the envelope, its seq, its hash).

    The log is verified first (a checkpoint must not vouch for an altered record): from
    ``since`` on (the seq and hash of a checkpoint made before, which the log must still
    hold), or whole. The events are made durable (a power loss must not take back an event
    it vouches for).

    Raises:
        VerificationError: the log does not verify, has no events yet, or no longer holds an
            event the home's marks say was verified or shipped (``_check_marks_held``).
    """
    _check_marks_held(record)
    report = record.verify(since)
    if not report.ok:
        raise VerificationError(
            f"the event log does not verify ({report.problem}): a checkpoint would vouch for an"
            " altered record",
            hint="`conveyor audit verify` says what is wrong",
        )
    if report.events == 0:
        raise VerificationError(
            "the record has no events yet: there is nothing to checkpoint",
            hint="run a pipeline first",
        )
    seq, digest = report.events, report.head_hash  # verified: seq runs 1..events
    first = record.event_hash_at(1)
    record.make_log_durable()
    statement = {
        "_type": CHECKPOINT_SCHEMA,
        "seq": seq,
        "hash": digest,
        "first_hash": first,
        "signed_at": signed_at,
    }
    envelope = key.sign(CHECKPOINT_TYPE, canonical_json(statement).encode())
    return envelope, seq, digest


class CheckpointUnmarked(ConveyorError):
    """Shipped, but not remembered as shipped (the home cannot be written)."""


FULL_VERIFICATION_S = 24 * 3600
"""A checkpoint verifies the whole log when the last whole verification is older than this
(else only the events since the last verification, and event 1)."""


def ship_checkpoint(
    record: Any,
    key: Any,
    command: str,
    *,
    env: Mapping[str, str],
    timeout_s: float,
    now: str,
    epoch: float,
    full: bool = False,
    again: bool = False,
) -> tuple[int, str]:
    """Sign the record's newest event and hand the checkpoint to ``command`` (standard input;
    ``CONVEYOR_CHECKPOINT_SEQ`` and a file name, ``CONVEYOR_CHECKPOINT_NAME``, in its
    environment), then remember it shipped. Returns (its seq, its name); the name is ``""``
    when that event was shipped already (``again``: it is shipped again).

    The log must still hold the event it was last verified up to, with the same hash (not an
    older copy put back, nor a rewrite). Then it is verified: whole with ``full``, if it never
    was, or if its last whole verification is older than ``FULL_VERIFICATION_S``; else from
    that event on, with event 1.

    Raises:
        VerificationError: the log does not verify (nothing is shipped).
        ConveyorError: the command failed (said how, with the end of its output).
    """
    from conveyor.adapters.shipper import ship
    from conveyor.store.sqlite import SHIPPED, VERIFIED, read_mark, write_mark

    verified = read_mark(record.path, VERIFIED)  # held: make_checkpoint checks it
    whole_at = verified.get("whole_at") if verified else None
    if (
        full
        or not isinstance(whole_at, int | float)
        or not 0 <= epoch - whole_at < FULL_VERIFICATION_S
    ):
        verified, whole_at = None, epoch
    since = (verified["seq"], verified["hash"]) if verified else None
    envelope, seq, digest = make_checkpoint(record, key, now, since)
    write_mark(record.path, VERIFIED, seq, digest, whole_at=whole_at)
    shipped = read_mark(record.path, SHIPPED)
    if not again and shipped is not None and (shipped["seq"], shipped["hash"]) == (seq, digest):
        return seq, ""
    first = record.event_hash_at(1) or ""
    if not (_HASH.fullmatch(first) and _HASH.fullmatch(digest)):  # verified: never, but named
        raise VerificationError("the record's hashes are not sha256 hex digests: nothing shipped")
    # The record, the event and its hash: a checkpoint of another history (an older copy put
    # back, then written to) never takes the name of one shipped before. Shell-safe.
    name = f"checkpoint-{first[:16]}-{seq}-{digest[:16]}.json"
    data = (json.dumps(envelope, indent=2) + "\n").encode("ascii")
    problem = ship(
        command,
        data,
        {**env, "CONVEYOR_CHECKPOINT_SEQ": str(seq), "CONVEYOR_CHECKPOINT_NAME": name},
        timeout_s,
    )
    if problem is not None:
        raise ConveyorError(
            f"the checkpoint of event {seq} was not shipped: CONVEYOR_CHECKPOINT_COMMAND {problem}",
            hint="the next command that writes to the record ships one again, as does `conveyor"
            " audit checkpoint --ship`; until then, the events since the last one shipped are"
            " covered by the hash chain and the head mark only",
        )
    if not write_mark(record.path, SHIPPED, seq, digest, shipped_at=now):
        raise CheckpointUnmarked(
            f"the checkpoint of event {seq} was shipped as {name}, but {record.path.name}"
            f"{SHIPPED} cannot be written: `audit verify` will not tell it, and the next"
            " command that writes ships it again",
            hint=f"check that {record.path.name}{SHIPPED} can be written (a file, in a"
            f" writable {record.path.parent})",
        )
    return seq, name


def _check_marks_held(record: Any) -> None:
    """Refuse to sign for a log that no longer holds an event the home's marks name: the
    one it was last verified up to, the last one shipped (an older copy of the record put
    back verifies on its own)."""
    from conveyor.store.sqlite import SHIPPED, VERIFIED, read_mark

    db = record.path.name
    for mark, ends, differs in (
        (VERIFIED, "which it was verified up to before", "the record was verified up to before"),
        (
            SHIPPED,
            "which the last checkpoint shipped vouches for",
            "the last checkpoint shipped vouches for",
        ),
    ):
        found = read_mark(record.path, mark)
        if found is None:
            continue
        seq = found["seq"]
        held = record.event_hash_at(seq)
        if held == found["hash"]:
            continue
        problem = (
            f"the record ends before event {seq}, {ends} ({db}{mark}): an older copy of it was"
            " put back, or events were removed from its end"
            if held is None
            else f"event {seq} is not the one {differs} ({db}{mark}): the log was rewritten, or"
            " an older copy of it put back, since"
        )
        raise VerificationError(
            f"{problem}; no checkpoint is signed for it",
            hint="`conveyor audit verify --checkpoint FILE` with the checkpoints shipped tells"
            f" what changed; if the record was restored from a backup on purpose, delete"
            f" {db}{VERIFIED} and {db}{SHIPPED} beside it to sign again",
        )


def check_checkpoint(
    record: Any, report: Any, source: str, data: bytes, public_pem: str
) -> CheckpointCheck:
    """Whether the log still holds the event a checkpoint (untrusted ``data``) vouches for;
    ``report`` is the log's own verification (an event altered before it breaks it too)."""
    from conveyor.adapters.signing import open_envelope

    if len(data) > MAX_CHECKPOINT_BYTES:
        return CheckpointCheck(
            source, INVALID, problem=f"it is larger than {MAX_CHECKPOINT_BYTES} bytes"
        )
    try:
        payload = open_envelope(data, public_pem, payload_type=CHECKPOINT_TYPE, what="checkpoint")
        statement = _statement(payload)
    except VerificationError as exc:
        return CheckpointCheck(source, INVALID, problem=exc.message)
    seq, signed_at = statement["seq"], statement["signed_at"]

    def altered(problem: str) -> CheckpointCheck:
        return CheckpointCheck(source, ALTERED, seq, signed_at, problem)

    first = record.event_hash_at(1)
    if first is None:
        return altered(f"the log has no event 1: it vouches for events 1..{seq}")
    if first != statement["first_hash"]:
        return altered(
            "event 1 is not the one it names: it is a checkpoint of another record, or the"
            " whole log was rewritten"
        )
    found = record.event_hash_at(seq)
    if found is None:
        return altered(
            f"it vouches for event {seq}, but the log ends before it: events were removed from"
            " its end since"
        )
    if found != statement["hash"]:
        return altered(f"event {seq} is not the one it vouches for: the log was rewritten since")
    bad = report.first_bad_seq
    if bad is not None and bad <= seq:
        return altered(
            f"event {bad}, which it vouches for, does not verify: the log was altered since"
        )
    return CheckpointCheck(source, OK, seq, signed_at)


def _statement(payload: bytes) -> dict[str, Any]:
    """The checked fields of a checkpoint's signed payload."""
    try:
        statement = loads_strict(payload)
    except ValueError as exc:
        raise VerificationError(f"the signed checkpoint is not valid JSON: {exc}") from None
    if not isinstance(statement, dict) or statement.get("_type") != CHECKPOINT_SCHEMA:
        raise VerificationError(f"the signed payload is not a {CHECKPOINT_SCHEMA} checkpoint")
    seq = statement.get("seq")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise VerificationError("the checkpoint's 'seq' is not an event number")
    for name in ("hash", "first_hash"):
        value = statement.get(name)
        if not isinstance(value, str) or not _HASH.fullmatch(value):
            raise VerificationError(f"the checkpoint's '{name}' is not a sha256 hex digest")
    if not isinstance(statement.get("signed_at"), str):
        raise VerificationError("the checkpoint's 'signed_at' is not a string")
    return statement
