"""The record on SQLite: a hash-linked event log plus the read models derived from it.

Every ``append`` is one ``BEGIN IMMEDIATE`` transaction that inserts the events, each hash-linked
to the one before, and updates the read models (runs, stages, jobs, attempts, test results, job
cache). The database runs in WAL mode with ``synchronous=NORMAL``, which survives a crash of the
process (``kill -9``) without losing a committed transaction; transactions that start or end a
run are committed with ``synchronous=FULL`` so they also survive a power loss. Triggers make the
event table append-only. Schema changes are Alembic migrations (``conveyor.store.migrate``).

After each such durable commit the newest event's sequence number and hash are also written
next to the database (``conveyor.db.head``): a log cut short from outside (a deleted
write-ahead log, a database replaced or emptied) then no longer verifies, which a hash chain
alone cannot tell.

This adapter uses the stdlib ``sqlite3`` driver directly on the hot path: importing SQLAlchemy
costs about 0.2 s per command, more than a whole cached run is allowed to take (ADR 0003).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.domain import events as ev
from conveyor.domain.canonical import canonical_json
from conveyor.domain.ports import CacheHit
from conveyor.errors import LeaseLost, PermissionDenied, StoreError

if TYPE_CHECKING:
    from conveyor.domain.delivery import ArtifactRecord

GENESIS = "0" * 64
_DURABLE_KINDS = frozenset({"run.started", "run.finished", "run.interrupted"})
_HEAD_FLAG = 1
"""``PRAGMA user_version`` once a head mark was written for the database (ADR 0008)."""


def canonical(value: object) -> str:
    """The canonical JSON text used for hashing and storing payloads."""
    return canonical_json(value)


def event_hash(prev_hash: str, seq: int, at: str, kind: str, run_id: int, payload: str) -> str:
    """Hash of one event: covers its position, time, type, run, payload and the previous hash.

    The fields are joined by newlines; none can contain one (``payload`` is compact JSON), so
    the encoding is unambiguous. The payload is hashed exactly as stored.
    """
    material = f"{prev_hash}\n{seq}\n{at}\n{kind}\n{run_id}\n{payload}"
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(frozen=True)
class AuditReport:
    """Result of verifying the event log."""

    ok: bool
    events: int
    first_bad_seq: int | None = None
    problem: str = ""
    head_hash: str = GENESIS


def head_path(db_path: Path) -> Path:
    """Where the newest durable event of the record at ``db_path`` is remembered."""
    return db_path.with_name(db_path.name + ".head")


def read_head(db_path: Path) -> tuple[int, str] | None:
    """The remembered ``(seq, hash)`` of the newest durable event, if any (and readable)."""
    head, _ = _head_of(db_path)
    return head


def _head_of(db_path: Path) -> tuple[tuple[int, str] | None, str]:
    """The remembered ``(seq, hash)``, or ``None`` and why not (``""``: there is no mark)."""
    try:
        text = head_path(db_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"cannot be read ({exc})"
    try:
        data = json.loads(text)
        seq, digest = data["seq"], data["hash"]
    except (ValueError, TypeError, KeyError, RecursionError):  # deep nesting: not a mark
        return None, "is not a mark Conveyor wrote (a JSON object with 'seq' and 'hash')"
    if type(seq) is not int or seq < 1 or not isinstance(digest, str):
        return None, "is not a mark Conveyor wrote (a JSON object with 'seq' and 'hash')"
    return (seq, digest), ""


def check_not_lost(db_path: Path) -> None:
    """Refuse a record whose database is gone or empty although it held events.

    Starting a new record there would reuse run ids (and their log files) and hide the loss.
    """
    head = read_head(db_path)
    if head is None:
        return
    try:
        empty = db_path.stat().st_size == 0
    except FileNotFoundError:
        empty = True
    except OSError:
        return  # opening it reports the problem
    if empty:
        raise StoreError(
            f"the record {db_path} is missing or empty, but it held {head[0]} events"
            f" ({head_path(db_path).name} remembers the last one)",
            hint="restore the database (and its -wal file) from a backup, or move this home"
            " away to start a new record",
        )


def _write_head(db_path: Path, seq: int, digest: str) -> None:
    """Remember a durable event, unless a newer one is remembered (concurrent writers)."""
    known = read_head(db_path)
    if known is not None and known[0] >= seq:
        return
    # A secondary check: never fails a committed write.
    _replace_file(head_path(db_path), json.dumps({"seq": seq, "hash": digest}) + "\n")


def _replace_file(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` through a temporary file beside it (readers see the old file
    or the new one); whether it was written (the temporary file never stays)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except BaseException as exc:  # a Ctrl-C too: the temporary file never stays
        with contextlib.suppress(OSError):
            temporary.unlink()
        if not isinstance(exc, OSError):
            raise
        return False
    return True


SHIPPED, VERIFIED = ".shipped", ".verified"
"""Marks beside the database (``conveyor.db.shipped``, ``conveyor.db.verified``): the newest
checkpoint shipped off this machine, and the newest event the log was verified up to (the next
checkpoint verifies from there on)."""
_HEX64 = re.compile(r"[0-9a-f]{64}")


def mark_path(db_path: Path, mark: str) -> Path:
    return db_path.with_name(db_path.name + mark)


def read_mark(db_path: Path, mark: str) -> dict[str, Any] | None:
    """A mark's fields (``seq`` and ``hash`` checked), if it is there and is one: a mark that
    cannot be read is as none."""
    try:  # a regular file of a few hundred bytes (never a FIFO that would hang us)
        fd = os.open(mark_path(db_path, mark), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = json.loads(handle.read(4096).decode("utf-8"))
        seq, digest = data["seq"], data["hash"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if type(seq) is not int or not 0 < seq < 2**63:
        return None
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        return None
    return dict(data)


def write_mark(db_path: Path, mark: str, seq: int, digest: str, **fields: object) -> bool:
    """Write a mark, unless one names a later event (concurrent commands); whether it is
    written (or a later one is there). At worst, the next checkpoint verifies or ships again."""
    known = read_mark(db_path, mark)
    if known is not None and known["seq"] > seq:
        return True
    text = json.dumps({"seq": seq, "hash": digest, **fields}) + "\n"
    return _replace_file(mark_path(db_path, mark), text)


def connect(path: Path) -> sqlite3.Connection:
    """Open the database with the pragmas every connection needs."""
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        # Checkpoints (WAL -> database, two fsyncs: 25-50 ms here) every ~32 MiB of log
        # instead of every 1,000 pages: a run's many small commits rewrite the same pages, so
        # fewer, larger checkpoints; a run of 1,000 jobs (≈ 16 MiB of log) has none until its
        # end, where ``fold_log`` empties the log once (after the exit code, when resident).
        pages = _CHECKPOINT_BYTES // conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA wal_autocheckpoint={pages}")
        conn.execute(f"PRAGMA journal_size_limit={_CHECKPOINT_BYTES}")
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError):  # locked, unreadable, no space...
            raise StoreError(f"cannot open the record at {path}: {exc}") from exc
        if "malformed" in str(exc):  # a SQLite file, with flipped bytes
            raise _unreadable(path, exc) from exc
        raise StoreError(
            f"{path} is not a Conveyor record: {exc}",
            hint="point --home at another folder, or move the file away",
        ) from exc
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the record at {path}: {exc}") from exc
    return conn


_CHECKPOINT_BYTES = 32 << 20
_FOLD_MIN_BYTES = 1 << 20
"""A log smaller than this is left for later: its index is rebuilt in well under 1 ms."""
_ARTIFACT_COLUMNS = "name, kind, digest, size, path, provenance, job, run_id"
_OVERRIDE_KEYS = (
    "id",
    "environment",
    "gate",
    "digest",
    "run",
    "actor",
    "reason",
    "created_at",
    "created_epoch",
    "expires_epoch",
    "needs_confirmation",
    "confirmed_by",
    "confirmed_at",
    "used",
)
_OVERRIDE_COLUMNS = ", ".join("run_id" if k == "run" else k for k in _OVERRIDE_KEYS)


def _override(row: Sequence[Any]) -> dict[str, Any]:
    item = dict(zip(_OVERRIDE_KEYS, row, strict=True))
    item["needs_confirmation"] = bool(item["needs_confirmation"])
    return item


_DEPLOYMENT_KEYS = (
    "id",
    "environment",
    "run",
    "artifact",
    "digest",
    "revision",
    "actor",
    "trigger",
    "strategy",
    "status",
    "reason",
    "health",
    "previous_digest",
    "previous_deployment",
    "lease",
    "started_at",
    "finished_at",
    "duration_s",
    "hotfix",
    "overridden",
)
_DEPLOYMENT_COLUMNS = ", ".join("run_id" if key == "run" else key for key in _DEPLOYMENT_KEYS)


def _deployment(row: Sequence[Any]) -> dict[str, Any]:
    doc = dict(zip(_DEPLOYMENT_KEYS, row, strict=True))
    doc["hotfix"], doc["overridden"] = bool(doc["hotfix"]), bool(doc["overridden"])
    return doc


def _artifact(row: Sequence[Any]) -> ArtifactRecord:
    from conveyor.domain.delivery import ArtifactRecord

    return ArtifactRecord(*row)


_FLUSH_EVERY = 64
"""Commits between two background flushes of the write-ahead log (≈ 0.7 MB for a run's jobs)."""


class _LogFlusher:
    """Writes the write-ahead log to disk in the background while a run appends to it.

    A run's per-job commits are not synced (``synchronous=NORMAL``); its end is, and that
    ``fsync`` had to write everything the run wrote since its start (≈ 45 ms for a run of
    1,000 jobs here). ``fdatasync`` of the log every few commits, from a thread (the GIL is
    released meanwhile), leaves the end only the last few. It changes no guarantee: nothing
    waits for it. SQLite takes no lock on the log file itself, so the descriptor of our own
    is safe to close.
    """

    def __init__(self, wal_path: str) -> None:
        self._fd = os.open(wal_path, os.O_RDONLY | os.O_CLOEXEC)
        self._pid = os.getpid()
        self._wanted = threading.Event()
        self._stopped = False
        try:
            threading.Thread(target=self._loop, name="conveyor-log-flusher", daemon=True).start()
        except BaseException:  # no thread to be had (a limit on threads or memory)
            os.close(self._fd)
            raise

    def alive(self) -> bool:
        """Not a copy inherited by a forked child (its thread stayed in the parent)."""
        return self._pid == os.getpid() and not self._stopped

    def kick(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stopped = True
        self._wanted.set()

    def _loop(self) -> None:
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopped:
                    return
                os.fdatasync(self._fd)
        except OSError:
            return  # the disk's problem shows up in the synced commit that follows
        finally:
            self._stopped = True
            os.close(self._fd)


class SqliteRecord:
    """``RecordWriter`` and the queries of the CLI, on one SQLite database."""

    def __init__(self, path: Path, now: Callable[[], str]) -> None:
        self.path = path
        self._now = now
        self._conn = connect(path)
        self._tail: tuple[int, str] | None = None  # (seq, hash) of the last event we wrote
        self._head_flagged = False
        self._unsynced = 0
        self._flusher: _LogFlusher | None = None
        self._flusher_failed = False
        self.appended = 0
        """How many events this connection appended (a command that wrote ships a checkpoint)."""

    def close(self) -> None:
        """Close the connection."""
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        self._conn.close()

    def _written_unsynced(self) -> None:
        """Count a commit left to the OS; every few, have the log flushed in the background."""
        self._unsynced += 1
        if self._unsynced < _FLUSH_EVERY:
            return
        self._unsynced = 0
        flusher = self._flusher
        if flusher is None or not flusher.alive():
            if self._flusher_failed:
                return
            try:
                flusher = self._flusher = _LogFlusher(str(self.path) + "-wal")
            except OSError:  # no log file, no descriptor left: tried again later
                return
            except Exception:  # no thread to be had: an optimisation never fails a write
                self._flusher_failed = True
                return
        flusher.kick()

    def fold_log(self, min_bytes: int = _FOLD_MIN_BYTES) -> bool:
        """Copy the write-ahead log into the database and empty it, if it is larger than
        ``min_bytes`` and no reader is in the way (never waits); whether it was emptied.

        The first connection of the next command would otherwise read the whole log to rebuild
        its index (about 1 ms per MB), and a later commit would stall on the checkpoint.
        """
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            if wal.stat().st_size <= min_bytes:
                return False
        except OSError:
            return False
        conn = self._conn
        try:
            conn.execute("PRAGMA busy_timeout=0")
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            finally:
                conn.execute("PRAGMA busy_timeout=30000")
        except sqlite3.Error:
            return False
        return not busy

    # -- writing -----------------------------------------------------------------------------

    def allocate_run_id(self) -> int:
        """A new run id, unique in this record."""
        try:
            cur = self._conn.execute(
                "INSERT INTO run_ids (allocated_at) VALUES (?)", (self._now(),)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot allocate a run id: {exc}") from exc
        assert cur.lastrowid is not None
        return cur.lastrowid

    def append(
        self,
        events: Sequence[ev.Event],
        fence: tuple[str, int] | None = None,
        guard: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        """Append events hash-linked and update read models, in one transaction.

        With ``fence`` (environment, lease token) nothing is written, and ``LeaseLost`` is
        raised, unless that token still holds the environment's lease: a deployer whose lease
        was taken over cannot write after the newer one. ``guard`` runs inside the transaction,
        before anything is written, and may raise to write nothing (a check no other writer
        can invalidate before the commit).
        """
        if not events:
            return
        durable = any(e.kind in _DURABLE_KINDS for e in events)
        conn = self._conn
        try:
            if durable:
                conn.execute("PRAGMA synchronous=FULL")
            try:
                # Another process may have appended since our last write: then link to the
                # real tail, read inside the write transaction (no other writer can move it).
                if not self._try_append(events, self._tail, fence, guard) and not (
                    self._try_append(events, None, fence, guard)
                ):
                    raise StoreError(f"the event log of {self.path} has a gap at its end")
            finally:
                if durable:
                    conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
            raise StoreError(
                f"cannot write to the record at {self.path}: {exc}",
                hint=f"free some space on the disk that holds {self.path.parent}" if full else None,
            ) from exc
        self.appended += len(events)
        if not durable:
            self._written_unsynced()
        else:
            self._unsynced = 0
        if durable and self._tail is not None:
            _write_head(self.path, *self._tail)
            if not self._head_flagged:
                self._flag_head()

    def _try_append(
        self,
        events: Sequence[ev.Event],
        tail: tuple[int, str] | None,
        fence: tuple[str, int] | None = None,
        guard: Callable[[sqlite3.Connection], None] | None = None,
    ) -> bool:
        """One transaction linking ``events`` after ``tail`` (``None``: read it first).

        Returns ``False``, with nothing written, when ``tail`` is no longer the last event
        (its successor's sequence number is taken: ``seq`` is the primary key).
        """
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if guard is not None:
                guard(conn)
            if fence is not None:
                row = conn.execute(
                    "SELECT token FROM leases WHERE environment = ?", (fence[0],)
                ).fetchone()
                if row is None or row[0] != fence[1]:
                    raise LeaseLost(
                        f"the lease on environment '{fence[0]}' was taken over"
                        f" (token {row[0] if row else 'none'}, ours {fence[1]}): this deployer"
                        " stopped writing",
                    )
            if tail is None:
                row = conn.execute(
                    "SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1"
                ).fetchone()
                tail = (row[0], row[1]) if row else (0, GENESIS)
            seq, prev = tail
            at = self._now()
            rows = []
            for event in events:
                seq += 1
                payload = canonical(event.payload())
                digest = event_hash(prev, seq, at, event.kind, event.run_id, payload)
                rows.append((seq, at, event.kind, event.run_id, payload, prev, digest))
                prev = digest
            try:
                conn.executemany(
                    "INSERT INTO events (seq, at, type, run_id, payload, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK")
                self._tail = None
                return False
            for event in events:
                _project(conn, event, at)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._tail = None
            raise
        self._tail = (seq, prev)
        return True

    def find_cache(self, cache_key: str) -> CacheHit | None:
        """The latest successful attempt recorded with ``cache_key``."""
        row = self._conn.execute(
            "SELECT run_id, name, attempts FROM jobs WHERE cache_key = ? AND status = 'succeeded'"
            " ORDER BY run_id DESC LIMIT 1",
            (cache_key,),
        ).fetchone()
        return CacheHit(row[0], row[1], row[2]) if row else None

    def job_artifacts(self, run_id: int, job: str) -> list[ArtifactRecord]:
        """The artifacts ``job`` published in run ``run_id``."""
        rows = self._conn.execute(
            f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE run_id = ? AND job = ? ORDER BY name",
            (run_id, job),
        ).fetchall()
        return [_artifact(row) for row in rows]

    # -- environments --------------------------------------------------------------------------

    def allocate_deployment_id(self) -> int:
        """A new deployment id, unique in this record."""
        try:
            cur = self._conn.execute(
                "INSERT INTO deployment_ids (allocated_at) VALUES (?)", (self._now(),)
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot allocate a deployment id: {exc}") from exc
        assert cur.lastrowid is not None
        return cur.lastrowid

    def allocate_id(self, kind: str) -> int:
        """A new id for an override or an incident (unique across both)."""
        try:
            cur = self._conn.execute(
                "INSERT INTO allocations (kind, at) VALUES (?, ?)", (kind, self._now())
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot allocate an id: {exc}") from exc
        assert cur.lastrowid is not None
        return cur.lastrowid

    # -- gates, approvals, overrides, users, incidents ----------------------------------------

    def users(self) -> list[dict[str, Any]]:
        """Every user and their roles."""
        rows = self._conn.execute(
            "SELECT name, roles, added_at, added_by FROM users ORDER BY name"
        ).fetchall()
        return [
            {"name": r[0], "roles": json.loads(r[1]), "added_at": r[2], "added_by": r[3]}
            for r in rows
        ]

    def change_user(self, event: ev.Event, actor: str) -> None:
        """Record a user's new roles: anyone may create the first user; after that only an
        admin may change users (checked inside the write transaction, so two first users cannot
        both be created)."""

        def only_admins(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT COUNT(*) FROM users").fetchone()[0] == 0:
                return
            row = conn.execute("SELECT roles FROM users WHERE name = ?", (actor,)).fetchone()
            if row is None or "admin" not in json.loads(row[0]):
                raise PermissionDenied(
                    f"{actor} may not manage users: that needs the admin role",
                    hint="ask an admin: `conveyor users list` shows them",
                )

        self.append([event], guard=only_admins)

    def roles_of(self, name: str) -> list[str] | None:
        """A user's roles (``None``: not a user)."""
        row = self._conn.execute("SELECT roles FROM users WHERE name = ?", (name,)).fetchone()
        return list(json.loads(row[0])) if row else None

    def approvals_for(self, environment: str, digest: str) -> list[dict[str, Any]]:
        """The approvals of one digest for one environment, oldest first."""
        rows = self._conn.execute(
            "SELECT approver, roles, comment, at, digest, run_id FROM approvals"
            " WHERE environment = ? AND digest = ? ORDER BY id",
            (environment, digest),
        ).fetchall()
        return [
            {
                "approver": r[0],
                "roles": json.loads(r[1]),
                "comment": r[2],
                "at": r[3],
                "digest": r[4],
                "run": r[5],
            }
            for r in rows
        ]

    def overrides_for(self, environment: str, digest: str, gate: str) -> list[dict[str, Any]]:
        """The overrides of one gate for one digest in one environment, newest first."""
        rows = self._conn.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides WHERE environment = ? AND digest = ?"
            " AND gate = ? ORDER BY id DESC",
            (environment, digest, gate),
        ).fetchall()
        return [_override(r) for r in rows]

    def override(self, override_id: int) -> dict[str, Any] | None:
        row = self._conn.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides WHERE id = ?", (override_id,)
        ).fetchone()
        return _override(row) if row else None

    def list_overrides(self, since_epoch: float) -> list[dict[str, Any]]:
        rows = self._conn.execute(
            f"SELECT {_OVERRIDE_COLUMNS} FROM overrides WHERE created_epoch >= ? ORDER BY id",
            (since_epoch,),
        ).fetchall()
        return [_override(r) for r in rows]

    def override_rates(self, since_epoch: float) -> dict[str, dict[str, Any]]:
        """Per environment: deployments finished since ``since_epoch`` and how many of them an
        override let through."""
        rows = self._conn.execute(
            "SELECT environment, COUNT(*), SUM(overridden) FROM deployments"
            " WHERE status IN ('succeeded', 'failed', 'rolled_back') AND finished_epoch >= ?"
            " GROUP BY environment",
            (since_epoch,),
        ).fetchall()
        return {
            env: {"deployments": n, "overridden": int(o or 0), "rate": (o or 0) / n if n else 0.0}
            for env, n, o in rows
        }

    def report_of(self, run_id: int, kind: str, path: str) -> dict[str, Any] | None:
        """A recorded coverage or metrics report of a run."""
        row = self._conn.execute(
            "SELECT data FROM reports WHERE run_id = ? AND kind = ? AND path = ?",
            (run_id, kind, path),
        ).fetchone()
        return dict(json.loads(row[0])) if row else None

    def test_counts(self, run_id: int) -> dict[str, int]:
        """The run's test counts from its JUnit reports (cached jobs count as their source)."""
        row = self._conn.execute(
            "SELECT COALESCE(SUM(tests_passed), 0), COALESCE(SUM(tests_failed), 0),"
            " COALESCE(SUM(tests_skipped), 0) FROM jobs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        return {"passed": row[0], "failed": row[1], "skipped": row[2]}

    def verdicts(
        self, *, environment: str | None = None, run_id: int | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recorded gate verdicts, newest first."""
        where: list[str] = []
        args: list[Any] = []
        if environment is not None:
            where.append("environment = ?")
            args.append(environment)
        if run_id is not None:
            where.append("run_id = ?")
            args.append(run_id)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        rows = self._conn.execute(
            "SELECT id, run_id, environment, stage, digest, gate, kind, verdict, summary,"
            f" evidence, override_id, at FROM gate_verdicts {clause} ORDER BY id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        keys = (
            "id",
            "run",
            "environment",
            "stage",
            "digest",
            "gate",
            "kind",
            "verdict",
            "summary",
            "evidence",
            "override",
            "at",
        )
        result = [dict(zip(keys, r, strict=True)) for r in rows]
        for item in result:
            item["evidence"] = json.loads(item["evidence"])
        return result

    def incident(self, incident_id: int) -> dict[str, Any] | None:
        row = self._conn.execute(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE id = ?", (incident_id,)
        ).fetchone()
        return dict(zip(_INCIDENT_KEYS, row, strict=True)) if row else None

    def incidents(
        self, environment: str | None = None, *, unresolved: bool = False, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Incidents, newest first; only ``environment``'s, only the unresolved ones."""
        where, args = ["1"], []
        if environment is not None:
            where.append("environment = ?")
            args.append(environment)
        if unresolved:
            where.append("resolved_at IS NULL")
        rows = self._conn.execute(
            f"SELECT {_INCIDENT_COLUMNS} FROM incidents WHERE {' AND '.join(where)}"
            " ORDER BY id DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [dict(zip(_INCIDENT_KEYS, row, strict=True)) for row in rows]

    def acquire_lease(
        self,
        environment: str,
        holder: str,
        *,
        pid: int,
        host: str,
        ttl_s: float,
        now: float,
        holder_gone: Callable[[int | None, str | None], bool],
    ) -> tuple[int | None, dict[str, Any] | None]:
        """Take the environment's lease: ``(token, None)``, or ``(None, current holder)``.

        The lease is free when released, expired, or held by a process ``holder_gone`` says
        is dead. Each acquisition gets a greater token (fencing).
        """
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT token, holder, holder_pid, holder_host, expires_at, released"
                    " FROM leases WHERE environment = ?",
                    (environment,),
                ).fetchone()
                if (
                    row is not None
                    and not row[5]
                    and row[4] > now
                    and not holder_gone(row[2], row[3])
                ):
                    conn.execute("ROLLBACK")
                    return None, {
                        "holder": row[1],
                        "pid": row[2],
                        "host": row[3],
                        "expires_in_s": round(row[4] - now, 1),
                    }
                token = (row[0] if row else 0) + 1
                conn.execute(
                    "INSERT INTO leases (environment, token, holder, holder_pid, holder_host,"
                    " acquired_at, expires_at, released) VALUES (?, ?, ?, ?, ?, ?, ?, 0)"
                    " ON CONFLICT (environment) DO UPDATE SET token = excluded.token,"
                    " holder = excluded.holder, holder_pid = excluded.holder_pid,"
                    " holder_host = excluded.holder_host, acquired_at = excluded.acquired_at,"
                    " expires_at = excluded.expires_at, released = 0",
                    (environment, token, holder, pid, host, now, now + ttl_s),
                )
                conn.execute("COMMIT")
                return token, None
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot take the lease on '{environment}': {exc}") from exc

    def renew_lease(self, environment: str, token: int, ttl_s: float, now: float) -> bool:
        """Extend our lease; ``False`` if it is no longer ours."""
        cur = self._conn.execute(
            "UPDATE leases SET expires_at = ? WHERE environment = ? AND token = ? AND released = 0",
            (now + ttl_s, environment, token),
        )
        return cur.rowcount == 1

    def release_lease(self, environment: str, token: int) -> None:
        """Give the lease back (only if it is still ours)."""
        self._conn.execute(
            "UPDATE leases SET released = 1 WHERE environment = ? AND token = ?",
            (environment, token),
        )

    def lease_of(self, environment: str) -> dict[str, Any] | None:
        """The lease row of an environment, if any."""
        row = self._conn.execute(
            "SELECT token, holder, holder_pid, holder_host, acquired_at, expires_at, released"
            " FROM leases WHERE environment = ?",
            (environment,),
        ).fetchone()
        keys = ("token", "holder", "pid", "host", "acquired_at", "expires_at", "released")
        return dict(zip(keys, row, strict=True)) if row else None

    def deployment(self, deployment_id: int) -> dict[str, Any] | None:
        """One deployment (the ``env history`` document's item)."""
        row = self._conn.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?", (deployment_id,)
        ).fetchone()
        return _deployment(row) if row else None

    def environment_names(self) -> list[str]:
        """Every environment the record knows (deployed to, or with an incident)."""
        rows = self._conn.execute(
            "SELECT name FROM environments UNION SELECT environment FROM deployments"
            " UNION SELECT environment FROM incidents ORDER BY 1"
        ).fetchall()
        return [row[0] for row in rows]

    def policy_in_force(self, environment: str) -> dict[str, Any] | None:
        """The policy the environment's last successful deployment was checked against:
        ``{"deployment", "digest", "branches"}`` (``None`` before any, or for deployments
        recorded before policies were)."""
        row = self._conn.execute(
            "SELECT e.payload FROM deployments d JOIN events e"
            " ON e.type = 'deployment.started' AND e.run_id = d.run_id"
            f" AND e.{_INDEXED_BY_RUN}"
            " AND json_extract(e.payload, '$.deployment_id') = d.id"
            " WHERE d.environment = ? AND d.status = 'succeeded' ORDER BY d.id DESC LIMIT 1",
            (environment,),
        ).fetchone()
        if row is None:
            return None
        payload = json.loads(row[0])
        if not payload.get("policy_digest"):
            return None
        return {
            "deployment": payload["deployment_id"],
            "digest": payload["policy_digest"],
            "branches": list(payload.get("policy_branches") or []),
        }

    def deployments(self, environment: str, limit: int = 50) -> list[dict[str, Any]]:
        """An environment's deployments, newest first."""
        rows = self._conn.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE environment = ?"
            " ORDER BY id DESC LIMIT ?",
            (environment, limit),
        ).fetchall()
        return [_deployment(row) for row in rows]

    def successful_revisions(self, environment: str, limit: int = 50) -> list[str]:
        """The distinct revisions that were deployed successfully to ``environment``, newest
        first (what a new deployment's commits are counted against)."""
        rows = self._conn.execute(
            "SELECT revision FROM deployments WHERE environment = ? AND status = 'succeeded'"
            " GROUP BY revision ORDER BY MAX(id) DESC LIMIT ?",
            (environment, limit),
        ).fetchall()
        return [row[0] for row in rows]

    def unfinished_deployments(self, environment: str) -> list[dict[str, Any]]:
        """Deployments recorded as started and never finished (their deployer died)."""
        rows = self._conn.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE environment = ?"
            " AND status = 'running' ORDER BY id",
            (environment,),
        ).fetchall()
        return [_deployment(row) for row in rows]

    def unfinished_deployments_of_run(self, run_id: int) -> list[dict[str, Any]]:
        """The deployments a run started and never finished."""
        rows = self._conn.execute(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE run_id = ?"
            " AND status = 'running' AND trigger = 'stage' ORDER BY id",
            (run_id,),
        ).fetchall()
        return [_deployment(row) for row in rows]

    def environment_state(self, environment: str) -> dict[str, Any] | None:
        """What runs in an environment now: its deployment id, status and since when."""
        row = self._conn.execute(
            "SELECT deployment, status, since FROM environments WHERE name = ?", (environment,)
        ).fetchone()
        return {"deployment": row[0], "status": row[1], "since": row[2]} if row else None

    def run_facts(self, run_id: int) -> dict[str, Any] | None:
        """What a promotion policy asks of a run: its branch, status and stage statuses.

        Read from the run's events, which ``audit verify`` covers, not from the read models
        (an edited ``runs.branch`` must not make a feature build look like one of ``main``).
        """
        rows = self._conn.execute(
            "SELECT type, payload FROM events WHERE run_id = ? AND type IN"
            " ('run.started', 'stage.finished', 'run.finished', 'run.interrupted')"
            f" AND {_INDEXED_BY_RUN} ORDER BY seq",
            (run_id,),
        ).fetchall()
        started = next((json.loads(p) for t, p in rows if t == "run.started"), None)
        if started is None:
            return None
        stages: dict[str, str] = {}
        status = "running"
        for kind, payload in rows:
            data = json.loads(payload)
            if kind == "stage.finished":
                stages[data["stage"]] = data["status"]
            elif kind == "run.finished":
                status = data["status"]
            elif kind == "run.interrupted":
                status = "interrupted"
        return {
            "branch": started.get("branch", ""),
            "status": status,
            "revision": started["revision"],
            "dirty": bool(started.get("dirty")),
            "stages": stages,
        }

    # -- reading -----------------------------------------------------------------------------

    def list_artifacts(self, run_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Published artifacts, newest run first (one run's if ``run_id`` is given)."""
        where, args = ("WHERE run_id = ?", (run_id, limit)) if run_id else ("", (limit,))
        rows = self._conn.execute(
            "SELECT run_id, name, stage, job, kind, digest, size, path, source_run, published_at"
            f" FROM artifacts {where} ORDER BY run_id DESC, name LIMIT ?",
            args,
        ).fetchall()
        keys = (
            "run",
            "name",
            "stage",
            "job",
            "kind",
            "digest",
            "size",
            "path",
            "built_by_run",
            "published_at",
        )
        result = [dict(zip(keys, row, strict=True)) for row in rows]
        for item in result:
            item["built_by_run"] = item["built_by_run"] or item["run"]
        return result

    def find_artifact(
        self, name: str | None, run_id: int | None, digest: str | None
    ) -> ArtifactRecord | None:
        """An artifact by ``name`` in run ``run_id``, or the latest publication of ``digest``."""
        if digest is not None:
            row = self._conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE digest = ?"
                " ORDER BY run_id DESC LIMIT 1",
                (digest,),
            ).fetchone()
        else:
            row = self._conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE run_id = ? AND name = ?",
                (run_id, name),
            ).fetchone()
        return _artifact(row) if row else None

    def latest_artifact_named(self, name: str) -> ArtifactRecord | None:
        """The latest publication of an artifact called ``name``."""
        row = self._conn.execute(
            f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE name = ?"
            " ORDER BY run_id DESC LIMIT 1",
            (name,),
        ).fetchone()
        return _artifact(row) if row else None

    def artifact_runs(self, digest: str) -> list[int]:
        """Every run that published ``digest`` (built it or reused it), oldest first."""
        rows = self._conn.execute(
            "SELECT DISTINCT run_id FROM artifacts WHERE digest = ? ORDER BY run_id", (digest,)
        ).fetchall()
        return [row[0] for row in rows]

    def resolve_run(self, ref: str) -> int | None:
        """Run id for ``ref`` (a number or ``latest``), or ``None`` if there is no such run."""
        if ref == "latest":
            row = self._conn.execute("SELECT MAX(id) FROM runs").fetchone()
            return row[0] if row and row[0] is not None else None
        if not (ref.isascii() and ref.isdigit()) or len(ref) > 18:  # not "²" nor "٣"
            return None
        row = self._conn.execute("SELECT id FROM runs WHERE id = ?", (int(ref),)).fetchone()
        return row[0] if row else None

    def list_runs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest runs, newest first."""
        rows = self._conn.execute(
            "SELECT id, pipeline, revision, status, started_at, finished_at, actor, dirty, reason"
            " FROM runs ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        keys = (
            "id",
            "pipeline",
            "revision",
            "status",
            "started_at",
            "finished_at",
            "actor",
            "dirty",
            "reason",
        )
        runs = [dict(zip(keys, row, strict=True)) for row in rows]
        for run in runs:
            self._check_row("runs", run, _RUN_TYPES)
            run["dirty"] = bool(run["dirty"])
            run["duration_s"] = _duration(run["started_at"], run["finished_at"])
        return runs

    def run_duration(self, run_id: int) -> float | None:
        """Seconds from a run's start to its end (``None`` while it runs or if unknown)."""
        row = self._conn.execute(
            "SELECT started_at, finished_at FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        return _duration(row[0], row[1]) if row else None

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        """One run with its stages and jobs (the ``runs show --json`` document)."""
        row = self._conn.execute(
            "SELECT id, pipeline, revision, pipeline_file, pipeline_digest, dirty, actor, status,"
            " reason, started_at, finished_at, owner_pid, owner_host FROM runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            return None
        keys = (
            "id",
            "pipeline",
            "revision",
            "pipeline_file",
            "pipeline_digest",
            "dirty",
            "actor",
            "status",
            "reason",
            "started_at",
            "finished_at",
            "owner_pid",
            "owner_host",
        )
        run: dict[str, Any] = dict(zip(keys, row, strict=True))
        self._check_row("runs", run, _RUN_TYPES)
        run["dirty"] = bool(run["dirty"])
        run["duration_s"] = _duration(run["started_at"], run["finished_at"])
        stages = self._conn.execute(
            "SELECT name, status, started_at, finished_at, reason FROM stages WHERE run_id = ?"
            " ORDER BY idx",
            (run_id,),
        ).fetchall()
        job_rows = self._conn.execute(
            "SELECT stage, name, status, exit_code, attempts, duration_s, started_at,"
            " finished_at, cache_key, cached_from_run, cached_from_attempt, reason,"
            " tests_passed, tests_failed, tests_skipped, cached_from_job FROM jobs WHERE run_id = ?"
            " ORDER BY idx",
            (run_id,),
        ).fetchall()
        jobs_by_stage: dict[str, list[dict[str, Any]]] = {}
        for j in job_rows:
            job: dict[str, Any] = {
                "name": j[1],
                "status": j[2],
                "exit_code": j[3],
                "attempts": j[4],
                "duration_s": j[5],
                "started_at": j[6],
                "finished_at": j[7],
                "cache_key": j[8],
                "cached_from": (
                    {"run": j[9], "job": j[15], "attempt": j[10]} if j[9] is not None else None
                ),
                "reason": j[11],
                "tests": (
                    {"passed": j[12], "failed": j[13], "skipped": j[14]}
                    if j[12] is not None
                    else None
                ),
            }
            self._check_row("jobs", job, _JOB_TYPES)
            jobs_by_stage.setdefault(j[0], []).append(job)
        for s in stages:
            self._check_row("stages", dict(zip(_STAGE_COLUMNS, s, strict=True)), _STAGE_TYPES)
        run["stages"] = [
            {
                "name": s[0],
                "status": s[1],
                "started_at": s[2],
                "finished_at": s[3],
                "reason": s[4],
                "jobs": jobs_by_stage.get(s[0], []),
            }
            for s in stages
        ]
        return run

    def _check_row(
        self, table: str, row: Mapping[str, Any], types: Mapping[str, tuple[type, ...]]
    ) -> None:
        """Refuse a read-model row holding what Conveyor never writes there (edited by hand)."""
        for name, allowed in types.items():
            value = row[name]
            if not isinstance(value, allowed):
                raise StoreError(
                    f"the record at {self.path} is damaged: {table} holds"
                    f" {type(value).__name__} {_short_repr(value)} as {name}",
                    hint=_DAMAGE_HINT,
                )

    def attempts(self, run_id: int, job: str) -> list[dict[str, Any]]:
        """Every attempt of a job of a run, oldest first: those that were retried, then the
        last one, kept in the job's row (its status, exit code and end are the job's)."""
        rows = self._conn.execute(
            "SELECT attempt, status, exit_code, pid, started_at, finished_at, duration_s,"
            " log_path, log_bytes, log_sha256, log_truncated FROM attempts"
            " WHERE run_id = ?1 AND job = ?2"
            " UNION ALL SELECT attempts, status, exit_code, attempt_pid,"
            " COALESCE(attempt_started_at, started_at), finished_at, attempt_duration_s,"
            " log_path, log_bytes, log_sha256, log_truncated FROM jobs"
            " WHERE run_id = ?1 AND name = ?2"
            " AND (log_path IS NOT NULL OR attempt_duration_s IS NOT NULL)"
            " AND attempts NOT IN (SELECT attempt FROM attempts WHERE run_id = ?1 AND job = ?2)"
            " ORDER BY 1",
            (run_id, job),
        ).fetchall()
        keys = (
            "attempt",
            "status",
            "exit_code",
            "pid",
            "started_at",
            "finished_at",
            "duration_s",
            "log",
            "log_bytes",
            "log_sha256",
            "log_truncated",
        )
        out = [dict(zip(keys, r, strict=True)) for r in rows]
        for item in out:  # null until the attempt ends (still running, or interrupted)
            self._check_row("attempts", item, _ATTEMPT_TYPES)
            if "\0" in item["log"]:
                raise StoreError(
                    f"the record at {self.path} is damaged: attempts holds a log path with a NUL",
                    hint=_DAMAGE_HINT,
                )
            if item["log_truncated"] is not None:
                item["log_truncated"] = bool(item["log_truncated"])
        return out

    def job_status(self, run_id: int, job: str) -> str | None:
        """Current status of a job of a run."""
        row = self._conn.execute(
            "SELECT status FROM jobs WHERE run_id = ? AND name = ?", (run_id, job)
        ).fetchone()
        return row[0] if row else None

    def test_results(self, run_id: int, job: str | None = None) -> list[dict[str, Any]]:
        """Per-test results of a run (of its last reported attempt per job)."""
        sql = (
            "SELECT job, attempt, name, classname, file, outcome, duration_s, message"
            " FROM test_results WHERE run_id = ?"
        )
        params: list[Any] = [run_id]
        if job is not None:
            sql += " AND job = ?"
            params.append(job)
        rows = self._conn.execute(sql + " ORDER BY id", params).fetchall()
        keys = ("job", "attempt", "name", "classname", "file", "outcome", "duration_s", "message")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def running_runs(self) -> list[dict[str, Any]]:
        """Runs recorded as running, with their owner, for crash recovery."""
        rows = self._conn.execute(
            "SELECT id, owner_pid, owner_host, owner_token FROM runs WHERE status = 'running'"
        ).fetchall()
        return [
            {"id": r[0], "owner_pid": r[1], "owner_host": r[2], "owner_token": r[3]} for r in rows
        ]

    def iter_events(
        self, after: int = 0
    ) -> Iterator[tuple[int, bytes, bytes, int, bytes, bytes, bytes]]:
        """Every stored event (after event ``after``) as ``(seq, at, type, run_id, payload,
        prev_hash, hash)``, its text as the stored bytes (a damaged record may hold bytes that
        are not UTF-8)."""
        query = (
            "SELECT seq, CAST(at AS BLOB), CAST(type AS BLOB), run_id, CAST(payload AS BLOB),"
            " CAST(prev_hash AS BLOB), CAST(hash AS BLOB) FROM events"
        )
        if after > 0:  # never ``seq > 0`` for all: an event numbered 0 or below is seen too
            yield from self._conn.execute(f"{query} WHERE seq > ? ORDER BY seq", (after,))
        else:
            yield from self._conn.execute(f"{query} ORDER BY seq")

    def events_of_run(self, run_id: int) -> list[dict[str, Any]]:
        """The events of one run, in order.

        The run index leaves out the two events of every job: they are read between the run's
        start and its end (the log's end while it runs), the others through the index.
        """
        first, end = self._conn.execute(
            "SELECT min(seq), max(CASE WHEN type IN ('run.finished', 'run.interrupted')"
            f" THEN seq END) FROM events WHERE run_id = ? AND {_INDEXED_BY_RUN}",
            (run_id,),
        ).fetchone()
        if first is None:
            return []
        rows = self._conn.execute(
            "SELECT seq, at, type, payload, hash FROM events"
            f" WHERE run_id = ?1 AND {_INDEXED_BY_RUN}"
            " UNION ALL SELECT seq, at, type, payload, hash FROM events"
            " WHERE seq BETWEEN ?2 AND ?3 AND run_id = ?1"
            " AND type IN ('job.attempt.started', 'job.finished') ORDER BY 1",
            (run_id, first, _MAX_SEQ if end is None else end),
        ).fetchall()
        return [
            {"seq": r[0], "at": r[1], "type": r[2], "payload": json.loads(r[3]), "hash": r[4]}
            for r in rows
        ]

    def verify(self, since: tuple[int, str] | None = None) -> AuditReport:
        """Check the hash chain, the sequence and the high-water mark of the event log.

        The head mark is read first (it names an event committed before it was written), then
        everything else in one read transaction: events appended meanwhile by a run are not
        taken for events removed from the end.

        With ``since`` (an event's seq and hash, verified before: ``conveyor.db.verified``),
        only the events after it are checked (and event 1), once that event is found unchanged.
        """
        flagged = self.head_was_written()  # before the mark: the mark is written first
        head = _head_of(self.path)
        conn = self._conn
        try:
            conn.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _unreadable(self.path, exc) from exc
        try:
            return self._verify(head, flagged, since)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    def _verify(
        self,
        head_of: tuple[tuple[int, str] | None, str],
        flagged: bool,
        since: tuple[int, str] | None = None,
    ) -> AuditReport:
        expected_prev = GENESIS
        count = 0
        last_seq = 0
        if since is not None:
            last_seq, expected_prev = since
            try:
                row = self._conn.execute(
                    "SELECT CAST(hash AS BLOB) FROM events WHERE seq = ?", (last_seq,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise _unreadable(self.path, exc) from exc
            if row is None or bytes(row[0] or b"") != expected_prev.encode():
                return AuditReport(
                    False,
                    0,
                    last_seq,
                    f"event {last_seq} is not the one the log was verified up to before"
                    f" (remembered in {mark_path(self.path, VERIFIED).name}): the log, or that"
                    " file, was altered since",
                )
            count = last_seq
            first = self._first_event_problem()
            if first:
                return AuditReport(False, 0, 1, first)
        try:
            for seq, *texts, run_id, raw_payload, raw_prev, raw_hash in self.iter_events(last_seq):
                count += 1
                try:  # read as bytes: the first event that is not UTF-8 is named
                    at, kind, payload, prev_hash, stored = (
                        bytes(value or b"").decode()
                        for value in (*texts, raw_payload, raw_prev, raw_hash)
                    )
                except UnicodeDecodeError as exc:
                    return AuditReport(
                        False,
                        count,
                        seq,
                        f"event {seq} holds text that is not UTF-8 ({exc.reason})",
                    )
                if seq <= last_seq:  # only the first can be (seq is unique): below 1
                    return AuditReport(
                        False,
                        count,
                        seq,
                        f"event {seq} has an invalid sequence number (they start at 1)",
                    )
                if seq != last_seq + 1:
                    return AuditReport(
                        False,
                        count,
                        last_seq + 1,
                        f"event {last_seq + 1} is missing (next is {seq})",
                    )
                if prev_hash != expected_prev:
                    return AuditReport(
                        False, count, seq, f"event {seq} does not link to event {last_seq}"
                    )
                try:
                    digest = event_hash(prev_hash, seq, at, kind, run_id, payload)
                except (ValueError, TypeError):
                    return AuditReport(False, count, seq, f"event {seq} is not valid JSON")
                if digest != stored:
                    return AuditReport(
                        False,
                        count,
                        seq,
                        f"event {seq} ({kind}) was altered: its hash does not match",
                    )
                expected_prev = stored
                last_seq = seq
            row = self._conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
            ).fetchone()
        except sqlite3.Error as exc:
            raise _unreadable(self.path, exc) from exc
        high = row[0] if row else 0
        if high > last_seq:
            return AuditReport(
                False,
                count,
                last_seq + 1,
                f"events {last_seq + 1}..{high} were removed from the end of the log",
            )
        head, unreadable = head_of
        mark = head_path(self.path).name
        if unreadable:
            return AuditReport(
                False,
                count,
                None,
                f"{mark} {unreadable}: events removed from the end of the log would go unseen",
            )
        if head is None and flagged:
            return AuditReport(
                False,
                count,
                None,
                f"{mark} is missing, though one was written: it remembers the newest durable"
                " event, so that events removed from the end of the log are seen",
            )
        if head is not None:
            seq, digest = head
            if seq > last_seq:
                return AuditReport(
                    False,
                    count,
                    last_seq + 1,
                    f"events {last_seq + 1}..{seq} were removed from the end of the log"
                    f" (event {seq} is remembered in {head_path(self.path).name}; was the"
                    f" write-ahead log {self.path.name}-wal deleted, or the database replaced?)",
                )
            try:
                row = self._conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
            except sqlite3.Error as exc:
                raise _unreadable(self.path, exc) from exc
            if row is None or row[0] != digest:
                return AuditReport(
                    False,
                    count,
                    seq,
                    f"event {seq} is not the one remembered in {head_path(self.path).name}:"
                    " the log was replaced",
                )
        return AuditReport(True, count, head_hash=expected_prev)

    def _first_event_problem(self) -> str:
        """What is wrong with event 1, if anything (it names the record: a verification from a
        later event checks it too)."""
        try:
            row = self._conn.execute(
                "SELECT seq, CAST(at AS BLOB), CAST(type AS BLOB), run_id, CAST(payload AS BLOB),"
                " CAST(prev_hash AS BLOB), CAST(hash AS BLOB) FROM events ORDER BY seq LIMIT 1"
            ).fetchone()
        except sqlite3.Error as exc:
            raise _unreadable(self.path, exc) from exc
        if row is not None and row[0] < 1:
            return f"event {row[0]} has an invalid sequence number (they start at 1)"
        if row is None or row[0] != 1:
            return "event 1 is missing"
        try:
            at, kind, payload, prev, stored = (
                bytes(value or b"").decode() for value in (*row[1:3], *row[4:])
            )
            digest = event_hash(prev, 1, at, kind, row[3], payload)
        except (UnicodeDecodeError, ValueError, TypeError):
            return "event 1 is damaged: it does not verify"
        if prev != GENESIS or digest != stored:
            return "event 1 was altered: its hash does not match"
        return ""

    def _flag_head(self) -> None:
        """Note in the database header that a head mark was written for it (once): from then
        on a missing mark means it was removed. Records of releases before the mark stay
        verifiable until their next run writes one.

        The note is checkpointed into the database file at once (a new record's log is
        small), so that deleting the write-ahead log together with the mark does not take the
        note away too. (The file is never opened beside SQLite to check: closing another
        descriptor of it would drop SQLite's locks on it.)
        """
        self._head_flagged = True
        with contextlib.suppress(sqlite3.Error):  # a secondary check: never fails a write
            if self._conn.execute("PRAGMA user_version").fetchone()[0] >= _HEAD_FLAG:
                return
            self._conn.execute(f"PRAGMA user_version = {_HEAD_FLAG}")
            self._conn.execute("PRAGMA busy_timeout=0")
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # never waits for readers
            finally:
                self._conn.execute("PRAGMA busy_timeout=30000")

    def make_log_durable(self) -> None:
        """Sync the write-ahead log: every committed event is then on disk (with
        ``synchronous=NORMAL`` a commit is not synced; what was copied into the database file
        was synced when it was). SQLite holds no lock on that file, so a second descriptor of
        it is safe to open and close."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return  # no log: every event is in the database file
        except OSError as exc:
            raise StoreError(f"cannot sync the write-ahead log {wal}: {exc.strerror}") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StoreError(f"cannot sync the write-ahead log {wal}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def event_hash_at(self, seq: int) -> str | None:
        """The stored hash of event ``seq`` (``None``: there is none)."""
        row = self._conn.execute("SELECT hash FROM events WHERE seq = ?", (seq,)).fetchone()
        return str(row[0]) if row else None

    def head_was_written(self) -> bool:
        """Whether a head mark was ever written for this record (the note in its header)."""
        try:
            return bool(self._conn.execute("PRAGMA user_version").fetchone()[0] >= _HEAD_FLAG)
        except sqlite3.Error as exc:
            raise _unreadable(self.path, exc) from exc


_DAMAGE_HINT = (
    "`conveyor audit verify` names the first bad event; restore the database (and its -wal"
    " file) from a backup"
)


def _unreadable(path: Path, exc: Exception) -> StoreError:
    """The error for a record whose bytes cannot be read as Conveyor wrote them."""
    if isinstance(exc, UnicodeDecodeError):
        detail = f"it holds text that is not UTF-8 ({exc.reason})"
    elif isinstance(exc, json.JSONDecodeError):
        detail = f"a stored JSON value is not valid JSON ({exc.msg})"
    elif isinstance(exc, sqlite3.OperationalError) and "decode" not in str(exc):
        # Locked, unreadable, no space: the record is fine, reading it failed.
        return StoreError(f"cannot read the record at {path}: {exc}")
    elif "decode" in str(exc):  # sqlite3's "Could not decode to UTF-8 column 'x' with text ..."
        column = re.search(r"column '(\w+)'", str(exc))
        detail = "it holds text that is not UTF-8" + (f" (column {column[1]})" if column else "")
    else:
        detail = str(exc).replace("\n", " ")[:300]
    return StoreError(f"the record at {path} is damaged: {detail}", hint=_DAMAGE_HINT)


def _reading(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with damaged bytes (flipped bytes, text that is not UTF-8, JSON that is not)
    turned into a :class:`StoreError` instead of escaping as a foreign exception."""

    @functools.wraps(method)
    def guarded(self: SqliteRecord, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (sqlite3.DatabaseError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _unreadable(self.path, exc) from exc

    return guarded


# Every query method, rather than a try in each: a damaged page can surface in any of them.
for _name, _method in list(vars(SqliteRecord).items()):
    if (
        inspect.isfunction(_method)
        and not _name.startswith("_")
        and not inspect.isgeneratorfunction(_method)
    ):
        setattr(SqliteRecord, _name, _reading(_method))


_TEXT: tuple[type, ...] = (str,)
_TEXT_OR_NULL: tuple[type, ...] = (str, type(None))
_INT_OR_NULL: tuple[type, ...] = (int, type(None))
_NUMBER_OR_NULL: tuple[type, ...] = (int, float, type(None))
_RUN_TYPES = {
    "id": (int,),
    "pipeline": _TEXT,
    "revision": _TEXT,
    "status": _TEXT,
    "started_at": _TEXT,
    "finished_at": _TEXT_OR_NULL,
    "actor": _TEXT_OR_NULL,
    "reason": _TEXT_OR_NULL,
}
_STAGE_COLUMNS = ("name", "status", "started_at", "finished_at", "reason")
_STAGE_TYPES = {
    "name": _TEXT,
    "status": _TEXT,
    "started_at": _TEXT_OR_NULL,
    "finished_at": _TEXT_OR_NULL,
    "reason": _TEXT_OR_NULL,
}
_JOB_TYPES = {
    "name": _TEXT,
    "status": _TEXT,
    "exit_code": _INT_OR_NULL,
    "attempts": _INT_OR_NULL,
    "duration_s": _NUMBER_OR_NULL,
    "started_at": _TEXT_OR_NULL,
    "finished_at": _TEXT_OR_NULL,
    "reason": _TEXT_OR_NULL,
}

_ATTEMPT_TYPES = {
    "attempt": (int,),
    "status": _TEXT,
    "exit_code": _INT_OR_NULL,
    "duration_s": _NUMBER_OR_NULL,
    "log": _TEXT,
    "log_bytes": _INT_OR_NULL,
}


_INDEXED_BY_RUN = "type NOT IN ('job.attempt.started', 'job.finished')"
"""The condition of the partial index ``events_run`` (a query must repeat it to use it)."""
_MAX_SEQ = (1 << 63) - 1


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _duration(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    from datetime import datetime

    try:
        delta = datetime.fromisoformat(end.rstrip("Z")) - datetime.fromisoformat(start.rstrip("Z"))
    except ValueError:
        return None
    return round(delta.total_seconds(), 3)


# -- projections: event -> read models (same transaction) ------------------------------------


def _project(conn: sqlite3.Connection, event: ev.Event, at: str) -> None:
    handler = _PROJECTIONS.get(event.kind)
    if handler is not None:
        handler(conn, event, at)


def _run_started(conn: sqlite3.Connection, e: Any, at: str) -> None:
    owner = e.owner
    conn.execute(
        "INSERT INTO runs (id, pipeline, revision, pipeline_file, pipeline_digest, dirty, actor,"
        " status, reason, started_at, owner_pid, owner_host, owner_token, branch)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'running', '', ?, ?, ?, ?, ?)",
        (
            e.run_id,
            e.pipeline,
            e.revision,
            e.pipeline_file,
            e.pipeline_digest,
            int(e.dirty),
            e.actor,
            at,
            owner.get("pid"),
            owner.get("host"),
            owner.get("token"),
            getattr(e, "branch", ""),
        ),
    )
    conn.executemany(
        "INSERT INTO stages (run_id, idx, name, status) VALUES (?, ?, ?, 'pending')",
        [(e.run_id, idx, stage["name"]) for idx, stage in enumerate(e.stages)],
    )
    jobs = [(stage["name"], job) for stage in e.stages for job in stage["jobs"]]
    conn.executemany(
        "INSERT INTO jobs (run_id, idx, name, stage, status, attempts)"
        " VALUES (?, ?, ?, ?, 'pending', 0)",
        [(e.run_id, idx, job, stage) for idx, (stage, job) in enumerate(jobs)],
    )


def _stage_started(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE stages SET status = 'running', started_at = ? WHERE run_id = ? AND name = ?",
        (at, e.run_id, e.stage),
    )


def _stage_finished(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE stages SET status = ?, finished_at = ?, reason = ? WHERE run_id = ? AND name = ?",
        (e.status, at, getattr(e, "reason", ""), e.run_id, e.stage),
    )


def _job_skipped(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE jobs SET status = 'skipped', reason = ?, finished_at = ?"
        " WHERE run_id = ? AND name = ?",
        (e.reason, at, e.run_id, e.job),
    )


def _job_cached(conn: sqlite3.Connection, e: Any, at: str) -> None:
    # Its coverage and metrics reports are those of the run that built it, as its test counts.
    conn.execute(
        "INSERT OR REPLACE INTO reports (run_id, job, kind, path, data)"
        " SELECT ?, ?, kind, path, data FROM reports WHERE run_id = ? AND job = ?",
        (e.run_id, e.job, e.source_run, e.source_job),
    )
    # The source job may have another name: cache keys cover what a job does, not its name.
    source = conn.execute(
        "SELECT tests_passed, tests_failed, tests_skipped FROM jobs WHERE run_id = ? AND name = ?",
        (e.source_run, e.source_job),
    ).fetchone() or (None, None, None)
    conn.execute(
        "UPDATE jobs SET status = 'cached', cache_key = ?, cached_from_run = ?,"
        " cached_from_job = ?, cached_from_attempt = ?, started_at = ?, finished_at = ?,"
        " duration_s = 0, exit_code = 0, tests_passed = ?, tests_failed = ?, tests_skipped = ?"
        " WHERE run_id = ? AND name = ?",
        (
            e.cache_key,
            e.source_run,
            e.source_job,
            e.source_attempt,
            at,
            at,
            *source,
            e.run_id,
            e.job,
        ),
    )


def _attempt_started(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE jobs SET status = 'running', attempts = ?2, cache_key = ?3,"
        " started_at = COALESCE(started_at, ?1), attempt_started_at = NULLIF(?1,"
        " COALESCE(started_at, ?1)), attempt_pid = NULL, attempt_duration_s = NULL,"
        " log_path = ?4, log_bytes = NULL, log_sha256 = NULL, log_truncated = NULL"
        " WHERE run_id = ?5 AND name = ?6",
        (at, e.attempt, e.cache_key, e.log, e.run_id, e.job),
    )


def _attempt_finished(conn: sqlite3.Connection, e: Any, at: str) -> None:
    """A retried attempt moves from the job's row to ``attempts`` (the next one takes its
    place in the row when it starts)."""
    conn.execute(
        "INSERT INTO attempts (run_id, job, attempt, status, exit_code, pid, started_at,"
        " finished_at, duration_s, log_path, log_bytes, log_sha256, log_truncated)"
        " SELECT run_id, name, ?, ?, ?, ?, COALESCE(attempt_started_at, started_at), ?, ?,"
        " log_path,"
        " ?, ?, ? FROM jobs WHERE run_id = ? AND name = ?",
        (
            e.attempt,
            e.status,
            e.exit_code,
            e.pid,
            at,
            e.duration_s,
            e.log_bytes,
            e.log_sha256,
            int(e.log_truncated),
            e.run_id,
            e.job,
        ),
    )


def _tests_reported(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.executemany(
        "INSERT INTO test_results (run_id, job, attempt, name, classname, file, outcome,"
        " duration_s, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                e.run_id,
                e.job,
                e.attempt,
                t["name"],
                t["classname"],
                t["file"],
                t["outcome"],
                t["duration_s"],
                t["message"],
            )
            for t in e.tests
        ],
    )
    conn.execute(
        "UPDATE jobs SET tests_passed = ?, tests_failed = ?, tests_skipped = ?"
        " WHERE run_id = ? AND name = ?",
        (e.passed, e.failed, e.skipped, e.run_id, e.job),
    )


def _job_finished(conn: sqlite3.Connection, e: Any, at: str) -> None:
    a = e.attempt
    if a is None:  # an older Conveyor's: its last attempt ended with ``job.attempt.finished``
        conn.execute(
            "UPDATE jobs SET status = ?, exit_code = ?, attempts = ?, duration_s = ?,"
            " finished_at = ?, cache_key = ? WHERE run_id = ? AND name = ?",
            (e.status, e.exit_code, e.attempts, e.duration_s, at, e.cache_key, e.run_id, e.job),
        )
        return
    conn.execute(
        "UPDATE jobs SET status = ?, exit_code = ?, attempts = ?, duration_s = ?,"
        " finished_at = ?, cache_key = ?, attempt_pid = ?, attempt_duration_s = ?,"
        " log_bytes = ?, log_sha256 = ?, log_truncated = ? WHERE run_id = ? AND name = ?",
        (
            e.status,
            e.exit_code,
            e.attempts,
            e.duration_s,
            at,
            e.cache_key,
            a["pid"],
            a["duration_s"],
            a["log_bytes"],
            a["log_sha256"],
            int(a["log_truncated"]),
            e.run_id,
            e.job,
        ),
    )


def _run_finished(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE runs SET status = ?, reason = ?, finished_at = ? WHERE id = ?",
        (e.status, e.reason, at, e.run_id),
    )


def _run_interrupted(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE runs SET status = 'interrupted', reason = ?, finished_at = ? WHERE id = ?",
        (e.reason, at, e.run_id),
    )
    conn.execute(
        "UPDATE jobs SET status = 'interrupted', finished_at = ?"
        " WHERE run_id = ? AND status IN ('running', 'pending')",
        (at, e.run_id),
    )
    conn.execute(
        "UPDATE stages SET status = 'interrupted', finished_at = ?"
        " WHERE run_id = ? AND status IN ('running', 'pending')",
        (at, e.run_id),
    )


def _artifact_published(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT INTO artifacts (run_id, name, stage, job, kind, digest, size, path, provenance,"
        " source_run, published_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            e.run_id,
            e.name,
            e.stage,
            e.job,
            e.artifact_kind,
            e.digest,
            e.size,
            e.path,
            e.provenance,
            e.source_run,
            at,
        ),
    )


def _deployment_started(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT INTO deployments (id, environment, run_id, artifact, digest, revision, actor,"
        " trigger, strategy, status, previous_digest, previous_deployment, lease, started_at,"
        " hotfix, overridden, started_epoch)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
        (
            e.deployment_id,
            e.environment,
            e.run_id,
            e.artifact,
            e.digest,
            e.revision,
            e.actor,
            e.trigger,
            e.strategy,
            e.previous_digest,
            e.previous_deployment,
            e.lease,
            at,
            int(getattr(e, "hotfix", False)),
            int(getattr(e, "overridden", False)),
            getattr(e, "started_epoch", None) or None,
        ),
    )


def _deployment_finished(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE deployments SET status = ?, reason = ?, health = ?, finished_at = ?,"
        " duration_s = ?, finished_epoch = ? WHERE id = ?",
        (
            e.status,
            e.reason,
            e.health,
            at,
            e.duration_s,
            getattr(e, "finished_epoch", None) or None,
            e.deployment_id,
        ),
    )
    commits = getattr(e, "commits", None)
    if commits:
        conn.executemany(
            'INSERT OR IGNORE INTO deployment_commits (deployment_id, "commit", committed_epoch)'
            " VALUES (?, ?, ?)",
            [(e.deployment_id, sha, when) for sha, when in commits],
        )
    running = e.running_deployment
    conn.execute(
        "INSERT INTO environments (name, deployment, status, since) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET deployment = excluded.deployment,"
        # A release someone stopped stays stopped when an interrupted deployment is ended.
        " status = CASE WHEN environments.status = 'stopped'"
        " AND environments.deployment IS excluded.deployment THEN 'stopped'"
        " ELSE excluded.status END,"
        " since = CASE WHEN environments.status = 'stopped'"
        " AND environments.deployment IS excluded.deployment THEN environments.since"
        " ELSE excluded.since END",
        (e.environment, running, _environment_status(e), at),
    )


def _environment_status(e: Any) -> str:
    """What a finished deployment leaves an environment: ``running``, ``down`` or ``unknown``."""
    if getattr(e, "running_uncertain", False):
        return "unknown"
    return "running" if e.running_deployment is not None else "down"


def _environment_stopped(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE environments SET status = 'stopped', since = ? WHERE name = ? AND deployment = ?",
        (at, e.environment, e.deployment_id),
    )


def _report_recorded(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO reports (run_id, job, kind, path, data) VALUES (?, ?, ?, ?, ?)",
        (e.run_id, e.job, e.report, e.path, canonical(e.data)),
    )


def _gate_evaluated(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT INTO gate_verdicts (run_id, environment, stage, digest, gate, kind, verdict,"
        " summary, evidence, override_id, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            e.run_id,
            e.environment,
            e.stage,
            e.digest,
            e.gate,
            e.gate_kind,
            e.verdict,
            e.summary,
            canonical(e.evidence),
            e.override_id,
            at,
        ),
    )
    if e.override_id is not None:
        conn.execute("UPDATE overrides SET used = used + 1 WHERE id = ?", (e.override_id,))


def _approval_given(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT INTO approvals (environment, digest, run_id, approver, roles, comment, at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (e.environment, e.digest, e.run_id, e.approver, canonical(e.roles), e.comment, at),
    )


def _override_granted(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT INTO overrides (id, environment, gate, digest, run_id, actor, reason, created_at,"
        " created_epoch, expires_epoch, needs_confirmation)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            e.override_id,
            e.environment,
            e.gate,
            e.digest,
            e.run_id,
            e.actor,
            e.reason,
            at,
            e.created_epoch,
            e.expires_epoch,
            int(e.needs_confirmation),
        ),
    )


def _override_confirmed(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE overrides SET confirmed_by = ?, confirmed_at = ? WHERE id = ?",
        (e.actor, at, e.override_id),
    )


def _user_changed(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT INTO users (name, roles, added_at, added_by) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name) DO UPDATE SET roles = excluded.roles",
        (e.name, canonical(sorted(e.roles)), at, e.actor),
    )


_INCIDENT_COLUMNS = (
    "id, environment, deployment_id, title, opened_by, opened_at, resolved_by, resolved_at"
)
_INCIDENT_KEYS = (
    "id",
    "environment",
    "deployment",
    "title",
    "opened_by",
    "opened_at",
    "resolved_by",
    "resolved_at",
)


def _incident_opened(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "INSERT INTO incidents (id, environment, deployment_id, title, opened_by, opened_at,"
        " opened_epoch) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (e.incident_id, e.environment, e.deployment_id, e.title, e.actor, at, e.opened_epoch),
    )


def _incident_resolved(conn: sqlite3.Connection, e: Any, at: str) -> None:
    conn.execute(
        "UPDATE incidents SET resolved_by = ?, resolved_at = ?, resolved_epoch = ? WHERE id = ?",
        (e.actor, at, e.resolved_epoch, e.incident_id),
    )


_PROJECTIONS: dict[str, Callable[[sqlite3.Connection, Any, str], None]] = {
    "job.report.recorded": _report_recorded,
    "gate.evaluated": _gate_evaluated,
    "approval.given": _approval_given,
    "override.granted": _override_granted,
    "override.confirmed": _override_confirmed,
    "user.changed": _user_changed,
    "incident.opened": _incident_opened,
    "incident.resolved": _incident_resolved,
    "environment.stopped": _environment_stopped,
    "deployment.started": _deployment_started,
    "deployment.finished": _deployment_finished,
    "artifact.published": _artifact_published,
    "run.started": _run_started,
    "stage.started": _stage_started,
    "stage.finished": _stage_finished,
    "job.skipped": _job_skipped,
    "job.cached": _job_cached,
    "job.attempt.started": _attempt_started,
    "job.attempt.finished": _attempt_finished,
    "job.tests.reported": _tests_reported,
    "job.finished": _job_finished,
    "run.finished": _run_finished,
    "run.interrupted": _run_interrupted,
}
