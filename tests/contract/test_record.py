"""Contract of the record: every RecordWriter implementation behaves the same.

``RecordContract`` runs against the in-memory fake and the SQLite store; the PostgreSQL store
will subclass it too.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor.domain import delivery_events as de
from conveyor.domain import events as ev
from conveyor.errors import LeaseLost, PermissionDenied, StoreError
from conveyor.store.migrate import ensure_schema
from conveyor.store.sqlite import SqliteRecord, _write_head, head_path, read_head
from tests.fakes import InMemoryRecord


def started(run_id: int) -> ev.RunStarted:
    return ev.RunStarted(
        run_id=run_id,
        pipeline="p",
        revision="r" * 40,
        pipeline_file="conveyor.yml",
        pipeline_digest="sha256:0",
        dirty=False,
        actor="me",
        stages=[{"name": "s", "jobs": ["a", "b"]}],
        owner={"pid": 1, "host": "h", "token": "t"},
    )


def attempt_started(run_id: int) -> ev.JobAttemptStarted:
    return ev.JobAttemptStarted(
        run_id=run_id, stage="s", job="a", attempt=1, cache_key="k", log=f"logs/{run_id}/a.1.log"
    )


def finished(run_id: int, job: str, key: str, status: str = "succeeded") -> ev.JobFinished:
    return ev.JobFinished(
        run_id=run_id,
        stage="s",
        job=job,
        status=status,
        exit_code=0,
        attempts=1,
        duration_s=0.1,
        cache_key=key,
    )


class RecordContract:
    @pytest.fixture
    def record(self) -> Iterator[object]:
        raise NotImplementedError

    def test_run_ids_are_unique(self, record) -> None:  # type: ignore[no-untyped-def]
        ids = {record.allocate_run_id() for _ in range(5)}
        assert len(ids) == 5

    def test_cache_hit_only_after_success(self, record) -> None:  # type: ignore[no-untyped-def]
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k1", "failed")])
        assert record.find_cache("k1") is None
        record.append([finished(run, "b", "k2")])
        hit = record.find_cache("k2")
        assert (hit.run_id, hit.job, hit.attempt) == (run, "b", 1)

    def test_latest_success_wins(self, record) -> None:  # type: ignore[no-untyped-def]
        first = record.allocate_run_id()
        record.append([started(first), finished(first, "a", "k")])
        second = record.allocate_run_id()
        record.append([started(second), finished(second, "a", "k")])
        assert record.find_cache("k").run_id == second


class TestInMemoryRecord(RecordContract):
    @pytest.fixture
    def record(self) -> Iterator[InMemoryRecord]:
        yield InMemoryRecord()


class TestSqliteRecord(RecordContract):
    @pytest.fixture
    def record(self, tmp_path: Path) -> Iterator[SqliteRecord]:
        db = tmp_path / "conveyor.db"
        ensure_schema(db)
        rec = SqliteRecord(db, lambda: "2026-01-01T00:00:00.000000Z")
        yield rec
        rec.close()

    def test_read_models_follow_events(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append(
            [
                started(run),
                ev.StageStarted(run_id=run, stage="s"),
                finished(run, "a", "k"),
                ev.JobSkipped(run_id=run, stage="s", job="b", reason="why"),
                ev.StageFinished(run_id=run, stage="s", status="succeeded"),
                ev.RunFinished(run_id=run, status="succeeded"),
            ]
        )
        doc = record.get_run(run)
        assert doc is not None
        assert doc["status"] == "succeeded"
        jobs = {j["name"]: j for j in doc["stages"][0]["jobs"]}
        assert jobs["a"]["status"] == "succeeded"
        assert jobs["b"]["status"] == "skipped"
        assert jobs["b"]["reason"] == "why"

    def test_the_stored_form_of_an_event_is_stable(self, record: SqliteRecord) -> None:
        """Canonical JSON and the hash of a known event, pinned: a change here would make every
        existing record fail ``audit verify``."""
        record.append([started(record.allocate_run_id())])
        conn = sqlite3.connect(record.path)
        payload, digest = conn.execute("SELECT payload, hash FROM events").fetchone()
        conn.close()
        assert payload == (
            '{"actor":"me","branch":"","dirty":false,"options":{},'
            '"owner":{"host":"h","pid":1,"token":"t"},"pipeline":"p",'
            '"pipeline_digest":"sha256:0","pipeline_file":"conveyor.yml",'
            f'"revision":"{"r" * 40}","run_id":1,"stages":[{{"jobs":["a","b"],"name":"s"}}]}}'
        )
        assert digest == "5919fdb623fcd5fde1985bf153e79a2f01f676ac30bb6079cdafa30ca21ef307"

    def test_the_newest_durable_event_is_remembered_beside_the_database(
        self, record: SqliteRecord, tmp_path: Path
    ) -> None:
        assert read_head(record.path) is None
        run = record.allocate_run_id()
        record.append([started(run)])
        head = read_head(record.path)
        assert head is not None and head[0] == 1
        record.append([finished(run, "a", "k")])  # not durable: the head stays
        assert read_head(record.path) == head
        record.append([ev.RunFinished(run_id=run, status="succeeded")])
        newest = read_head(record.path)
        assert newest is not None and newest[0] == 3
        assert record.verify().ok
        # A database replaced by another with as many events: the head's hash tells.
        other = tmp_path / "other.db"
        ensure_schema(other)
        forged = SqliteRecord(other, lambda: "2026-02-02T00:00:00.000000Z")
        forged_run = forged.allocate_run_id()
        forged.append([started(forged_run), finished(forged_run, "a", "k")])
        forged.append([ev.RunFinished(run_id=forged_run, status="failed")])
        forged.close()
        head_path(other).replace(tmp_path / "discarded.head")
        record.close()
        other.replace(record.path)
        replaced = SqliteRecord(record.path, lambda: "2026-01-01T00:00:00.000000Z")
        report = replaced.verify()
        replaced.close()
        assert not report.ok
        assert report.first_bad_seq == 3
        assert "remembered" in report.problem

    @pytest.mark.parametrize(
        ("content", "problem"),
        [
            (None, "conveyor.db.head is missing, though one was written"),
            ('{"seq": "x"}', "conveyor.db.head is not a mark Conveyor wrote"),
            ("", "conveyor.db.head is not a mark Conveyor wrote"),
            ('{"seq": 0, "hash": ""}', "conveyor.db.head is not a mark Conveyor wrote"),
        ],
    )
    def test_a_missing_or_damaged_head_does_not_verify(
        self, record: SqliteRecord, content: str | None, problem: str
    ) -> None:
        """Without its mark, a log cut short at the end would verify: say so instead."""
        assert record.verify().ok  # no run yet: no mark is needed
        run = record.allocate_run_id()
        record.append([started(run), ev.RunFinished(run_id=run, status="succeeded")])
        if content is None:
            head_path(record.path).unlink()
        else:
            head_path(record.path).write_text(content)
        report = record.verify()
        assert not report.ok and report.first_bad_seq is None
        assert report.problem.startswith(problem)

    @pytest.mark.parametrize(
        "edit",
        [
            "UPDATE runs SET started_at = NULL",
            "UPDATE jobs SET duration_s = 'x'",
            "UPDATE runs SET status = x'ff00'",
            "UPDATE jobs SET log_path = x'07'",
            "UPDATE jobs SET log_bytes = 'abc'",
            "UPDATE jobs SET log_path = 'logs/1/a' || char(0)",
        ],
    )
    def test_a_hand_edited_read_model_is_a_damaged_record(
        self, record: SqliteRecord, edit: str
    ) -> None:
        """Not a TypeError in `runs show` (an internal error): the record says it is damaged."""
        run = record.allocate_run_id()
        record.append([started(run), attempt_started(run), finished(run, "a", "k")])
        with sqlite3.connect(record.path) as conn:
            conn.execute(edit)
        if "log_" in edit:  # the last attempt is kept in the job's row
            with pytest.raises(StoreError, match=r"is damaged: attempts holds"):
                record.attempts(run, "a")
            return
        with pytest.raises(StoreError, match=r"is damaged: (runs|jobs|stages) holds"):
            record.get_run(run)
        if "runs" in edit:
            with pytest.raises(StoreError, match=r"is damaged: runs holds"):
                record.list_runs()

    def test_deleting_the_log_with_the_head_mark_does_not_verify(
        self, record: SqliteRecord
    ) -> None:
        """The note that a mark was written is in the database file, not only in its log."""
        run = record.allocate_run_id()
        record.append([started(run), ev.RunFinished(run_id=run, status="succeeded")])
        path = record.path
        record.close()
        for suffix in ("-wal", "-shm", ".head"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        reopened = SqliteRecord(path, lambda: "2026-01-01T00:00:00.000000Z")
        report = reopened.verify()
        reopened.close()
        assert not report.ok and "conveyor.db.head is missing" in report.problem

    def test_a_stale_head_never_replaces_a_newer_one(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run), ev.RunFinished(run_id=run, status="succeeded")])
        newest = read_head(record.path)
        assert newest is not None
        _write_head(record.path, 1, "0" * 64)  # a slower concurrent writer
        assert read_head(record.path) == newest

    def test_every_attempt_is_read_back_across_retries(self, record: SqliteRecord) -> None:
        """The last attempt is kept in the job's row, the retried ones in ``attempts``: read
        back as one list at every step, never twice."""
        run = record.allocate_run_id()
        ending = {
            "status": "succeeded",
            "exit_code": 0,
            "pid": 42,
            "duration_s": 0.5,
            "log_bytes": 3,
            "log_sha256": "c" * 64,
            "log_truncated": False,
        }
        record.append([started(run), attempt_started(run)])
        assert [(a["attempt"], a["status"], a["log"]) for a in record.attempts(run, "a")] == [
            (1, "running", f"logs/{run}/a.1.log")
        ]
        failed = {**ending, "status": "failed", "exit_code": 3, "log_truncated": True}
        record.append([ev.JobAttemptFinished(run_id=run, stage="s", job="a", attempt=1, **failed)])
        assert [(a["attempt"], a["status"]) for a in record.attempts(run, "a")] == [(1, "failed")]
        second = ev.JobAttemptStarted(
            run_id=run, stage="s", job="a", attempt=2, cache_key="k", log=f"logs/{run}/a.2.log"
        )
        record.append([second])
        record.append(
            [
                ev.JobFinished(
                    run_id=run,
                    stage="s",
                    job="a",
                    status="succeeded",
                    exit_code=0,
                    attempts=2,
                    duration_s=1.0,
                    cache_key="k",
                    attempt={"attempt": 2, **ending},
                )
            ]
        )
        tries = record.attempts(run, "a")
        assert [(a["attempt"], a["status"], a["exit_code"], a["log"]) for a in tries] == [
            (1, "failed", 3, f"logs/{run}/a.1.log"),
            (2, "succeeded", 0, f"logs/{run}/a.2.log"),
        ]
        assert tries[0]["log_truncated"] is True and tries[1]["log_truncated"] is False
        assert tries[1]["pid"] == 42 and tries[1]["log_sha256"] == "c" * 64
        assert all(a["started_at"] and a["finished_at"] for a in tries)
        assert record.attempts(run, "b") == []

    def test_a_running_attempt_of_an_interrupted_run_is_interrupted(
        self, record: SqliteRecord
    ) -> None:
        run = record.allocate_run_id()
        record.append([started(run), attempt_started(run)])
        record.append([ev.RunInterrupted(run_id=run, reason="its owner died")])
        (attempt,) = record.attempts(run, "a")
        assert attempt["status"] == "interrupted" and attempt["finished_at"]
        assert record.job_status(run, "a") == "interrupted"

    def test_the_events_of_a_run_are_all_found_among_other_runs(self, record: SqliteRecord) -> None:
        """Its jobs' starts and ends are not in the run index: found between its other events
        (or after them while it runs)."""
        first, second = record.allocate_run_id(), record.allocate_run_id()
        record.append([started(first), started(second)])
        for run in (first, second, first):
            record.append([attempt_started(run), finished(run, "a", "k")])
        record.append([ev.RunFinished(run_id=first, status="succeeded")])
        record.append([attempt_started(second), finished(second, "b", "k")])
        every = list(record.iter_events())
        for run in (first, second):
            expected = [seq for seq, _, _, run_id, *_ in every if run_id == run]
            assert [e["seq"] for e in record.events_of_run(run)] == expected
        assert len(record.events_of_run(second)) == 5
        assert record.events_of_run(99) == []
        # Events about a run after its end (a deployment of what it built) are its too.
        record.append([ev.RunFinished(run_id=second, status="succeeded")])
        for _ in range(3):
            record.append([started(record.allocate_run_id())])
        record.append([ev.StageStarted(run_id=first, stage="later")])
        every = list(record.iter_events())
        for run in (first, second):
            expected = [seq for seq, _, _, run_id, *_ in every if run_id == run]
            assert [e["seq"] for e in record.events_of_run(run)] == expected
        # Every query by run reaches the events through an index, never a scan of the log.
        statements: list[str] = []
        record._conn.set_trace_callback(statements.append)
        record.events_of_run(first)
        record.run_facts(first)
        record.policy_in_force("prod")
        record._conn.set_trace_callback(None)
        queries = [q for q in statements if "events" in q and q.lstrip().startswith("SELECT")]
        assert len(queries) == 4
        for query in queries:
            plan = " ".join(r[-1] for r in record._conn.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert "SCAN e " not in f"{plan} " and "SCAN events" not in plan, (query, plan)

    def test_jobs_are_numbered_across_stages(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        event = started(run)
        stages = [
            {"name": "s", "jobs": ["a", "b"]},
            {"name": "d", "jobs": []},
            {"name": "t", "jobs": ["c"]},
        ]
        record.append([ev.RunStarted(**{**event.payload(), "stages": stages})])
        conn = sqlite3.connect(record.path)
        rows = conn.execute("SELECT name, stage, idx FROM jobs ORDER BY idx").fetchall()
        stage_rows = conn.execute("SELECT name, idx FROM stages ORDER BY idx").fetchall()
        conn.close()
        assert rows == [("a", "s", 0), ("b", "s", 1), ("c", "t", 2)]
        assert stage_rows == [("s", 0), ("d", 1), ("t", 2)]

    def test_chain_verifies_and_detects_tampering(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k"), finished(run, "b", "k2")])
        assert record.verify().ok
        conn = sqlite3.connect(record.path)
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE events SET payload = '{}' WHERE seq = 2")
        conn.execute("DROP TRIGGER events_append_only_update")
        conn.execute("UPDATE events SET payload = replace(payload, '\"a\"', '\"x\"') WHERE seq = 2")
        conn.commit()
        conn.close()
        report = record.verify()
        assert not report.ok
        assert report.first_bad_seq == 2

    def test_an_event_numbered_below_1_is_the_first_bad_one(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k")])
        conn = sqlite3.connect(record.path)
        conn.execute(
            "INSERT INTO events (seq, at, type, run_id, payload, prev_hash, hash)"
            " SELECT 0, at, type, run_id, payload, prev_hash, hash FROM events WHERE seq = 1"
        )
        conn.commit()
        conn.close()
        report = record.verify()
        assert (report.ok, report.first_bad_seq) == (False, 0)
        assert report.problem == "event 0 has an invalid sequence number (they start at 1)"
        self._tamper(record, "UPDATE events SET seq = -seq")
        report = record.verify()
        assert (report.ok, report.first_bad_seq) == (False, -2)
        assert "event 1 is missing" not in report.problem

    def test_verifying_from_an_event_checks_only_what_follows_it(
        self, record: SqliteRecord
    ) -> None:
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k"), finished(run, "b", "k2")])
        two = record.event_hash_at(2)
        assert two is not None
        report = record.verify((2, two))
        assert (report.ok, report.events) == (True, 3)  # the head's seq, as a whole check
        assert report.head_hash == record.verify().head_hash
        assert record.verify((3, record.event_hash_at(3) or "")).ok  # nothing after it
        self._tamper(record, "UPDATE events SET payload = payload || ' ' WHERE seq = 3")
        report = record.verify((2, two))
        assert (report.ok, report.first_bad_seq) == (False, 3)
        other = record.verify((2, "0" * 64))  # the event it starts from must be unchanged
        assert (other.ok, other.first_bad_seq) == (False, 2)
        assert "is not the one the log was verified up to before" in other.problem
        assert not record.verify((9, two)).ok  # an event the log does not hold
        self._tamper(record, "UPDATE events SET payload = rtrim(payload) WHERE seq = 3")
        assert record.verify((2, two)).ok
        self._tamper(record, "UPDATE events SET hash = 'x' || substr(hash, 2) WHERE seq = 1")
        report = record.verify((2, two))  # event 1 names the record: always checked
        assert (report.ok, report.first_bad_seq) == (False, 1)
        assert report.problem == "event 1 was altered: its hash does not match"
        self._tamper(
            record,
            "INSERT INTO events (seq, at, type, run_id, payload, prev_hash, hash)"
            " SELECT 0, at, type, run_id, payload, prev_hash, hash FROM events WHERE seq = 1",
        )
        report = record.verify((2, two))
        assert report.problem == "event 0 has an invalid sequence number (they start at 1)"

    def test_removed_tail_is_detected(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k"), finished(run, "b", "k2")])
        conn = sqlite3.connect(record.path)
        conn.execute("DROP TRIGGER events_append_only_delete")
        conn.execute("DELETE FROM events WHERE seq = 3")
        conn.commit()
        conn.close()
        report = record.verify()
        assert not report.ok
        assert report.first_bad_seq == 3

    @staticmethod
    def _tamper(record: SqliteRecord, sql: str) -> None:
        conn = sqlite3.connect(record.path)
        conn.execute("DROP TRIGGER IF EXISTS events_append_only_update")
        conn.execute(sql)
        conn.commit()
        conn.close()

    def test_text_that_is_not_utf8_is_a_damaged_record(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k")])
        self._tamper(
            record, "UPDATE events SET payload = CAST(X'7B22FF227D' AS TEXT) WHERE seq = 2"
        )
        with pytest.raises(
            StoreError, match=r"is damaged: it holds text that is not UTF-8"
        ) as info:
            record.events_of_run(run)
        assert info.value.hint is not None and "audit verify" in info.value.hint
        report = record.verify()
        assert (report.ok, report.first_bad_seq) == (False, 2)
        assert report.problem.startswith("event 2 holds text that is not UTF-8")

    def test_a_read_model_that_is_not_utf8_is_a_damaged_record(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run)])
        conn = sqlite3.connect(record.path)
        conn.execute("UPDATE runs SET actor = CAST(X'61FF62' AS TEXT)")
        conn.commit()
        conn.close()
        for read in (lambda: record.get_run(run), lambda: record.list_runs()):
            with pytest.raises(StoreError, match=r"damaged: it holds text that is not UTF-8"):
                read()

    def test_a_payload_that_is_not_json_is_a_damaged_record(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k")])
        self._tamper(record, "UPDATE events SET payload = 'not json' WHERE seq = 2")
        with pytest.raises(StoreError, match=r"damaged: a stored JSON value is not valid JSON"):
            record.events_of_run(run)
        assert record.verify().first_bad_seq == 2

    def test_flipped_bytes_are_a_damaged_record(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append(
            [started(run), finished(run, "a", "k"), ev.StageStarted(run_id=run, stage="s")]
        )
        record.close()
        conn = sqlite3.connect(record.path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.close()
        data = bytearray(record.path.read_bytes())
        page = data.find(b"stage.started") // page_size * page_size
        data[page : page + 12] = bytes(b ^ 0xA5 for b in data[page : page + 12])
        record.path.write_bytes(bytes(data))
        damaged = SqliteRecord(record.path, lambda: "2026-01-01T00:00:00.000000Z")
        try:
            with pytest.raises(StoreError, match=r"is damaged: database disk image is malformed"):
                damaged.verify()
        finally:
            damaged.close()

    def test_a_failed_transaction_writes_nothing(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run)])
        before = list(record.iter_events())
        with pytest.raises(Exception):  # noqa: B017 - any store error
            record.append([finished(run, "a", "k"), started(run)])  # duplicate run row
        assert list(record.iter_events()) == before
        assert record.find_cache("k") is None

    def test_two_writers_interleaved_keep_one_chain(self, record: SqliteRecord) -> None:
        other = SqliteRecord(record.path, now=lambda: "2026-01-01T00:00:00.000000Z")
        try:
            mine, theirs = record.allocate_run_id(), other.allocate_run_id()
            record.append([started(mine)])
            other.append([started(theirs)])
            record.append([finished(mine, "a", "k1")])  # its remembered tail is stale now
            other.append([finished(theirs, "a", "k2")])
            record.append([finished(mine, "b", "k3")])
        finally:
            other.close()
        assert [e[0] for e in record.iter_events()] == [1, 2, 3, 4, 5]
        assert record.verify().ok
        assert record.find_cache("k2") is not None


class TestLeases:
    """One deployment per environment: leases with expiry, takeover and fencing."""

    @pytest.fixture
    def record(self, tmp_path: Path) -> Iterator[SqliteRecord]:
        db = tmp_path / "conveyor.db"
        ensure_schema(db)
        rec = SqliteRecord(db, lambda: "2026-01-01T00:00:00.000000Z")
        yield rec
        rec.close()

    @staticmethod
    def take(record: SqliteRecord, now: float, gone: bool = False) -> tuple[int | None, object]:
        return record.acquire_lease(
            "prod", "me", pid=1, host="h", ttl_s=10, now=now, holder_gone=lambda p, h: gone
        )

    def test_held_lease_is_refused_until_it_expires_or_is_released(
        self, record: SqliteRecord
    ) -> None:
        first, _ = self.take(record, 100.0)
        assert first == 1
        second, holder = self.take(record, 105.0)
        assert second is None and isinstance(holder, dict) and holder["expires_in_s"] == 5.0
        third, _ = self.take(record, 111.0)  # expired
        assert third == 2
        record.release_lease("prod", 2)
        fourth, _ = self.take(record, 112.0)
        assert fourth == 3

    def test_a_dead_holder_is_taken_over_at_once(self, record: SqliteRecord) -> None:
        assert self.take(record, 100.0)[0] == 1
        assert self.take(record, 101.0, gone=True)[0] == 2

    def test_a_stale_deployer_cannot_write(self, record: SqliteRecord) -> None:
        run = record.allocate_run_id()
        record.append([started(run)])
        stale, _ = self.take(record, 100.0)
        newer, _ = self.take(record, 200.0)
        assert stale is not None and newer is not None and newer > stale
        event = de.EnvironmentStopped(run_id=run, environment="prod", deployment_id=1, actor="a")
        before = list(record.iter_events())
        with pytest.raises(LeaseLost):
            record.append([event], fence=("prod", stale))
        assert list(record.iter_events()) == before
        record.append([event], fence=("prod", newer))
        assert len(list(record.iter_events())) == len(before) + 1
        assert not record.renew_lease("prod", stale, 10, 201.0)
        assert record.renew_lease("prod", newer, 10, 201.0)


def test_only_the_first_user_may_be_created_without_an_admin(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    ensure_schema(db)
    first = SqliteRecord(db, lambda: "2026-01-01T00:00:00.000000Z")
    second = SqliteRecord(db, lambda: "2026-01-01T00:00:00.000000Z")
    try:
        first.change_user(de.UserChanged(run_id=0, name="a", roles=["admin"], actor="a"), "a")
        # The other process checked "no users yet" too late: the check runs inside its write.
        with pytest.raises(PermissionDenied):
            second.change_user(de.UserChanged(run_id=0, name="b", roles=["admin"], actor="b"), "b")
        second.change_user(de.UserChanged(run_id=0, name="b", roles=["overrider"], actor="a"), "a")
        assert [u["name"] for u in second.users()] == ["a", "b"]
        assert second.verify().ok
    finally:
        first.close()
        second.close()


def test_an_orphan_is_recorded_interrupted_once_by_racing_commands(tmp_path: Path) -> None:
    """Two commands that both saw the run running: only the first records the interruption."""
    from conveyor.adapters.home import Home
    from conveyor.bootstrap import open_record, recover_orphans

    home = Home(tmp_path / "home")
    record = open_record(home)
    run = record.allocate_run_id()
    event = started(run)
    record.append(
        [ev.RunStarted(**{**vars(event), "owner": {"pid": None, "host": "", "token": ""}})]
    )
    stale = record.running_runs()  # what the second command read before the first wrote
    assert recover_orphans(record, home) == [run]
    record.running_runs = lambda: stale  # type: ignore[method-assign]
    assert recover_orphans(record, home) == []
    kinds = [e["type"] for e in record.events_of_run(run)]
    assert kinds.count("run.interrupted") == 1
    record.close()


def test_a_writer_that_loses_the_race_for_the_tail_twice_still_appends(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    ensure_schema(db)
    a = SqliteRecord(db, lambda: "now")
    b = SqliteRecord(db, lambda: "now")
    run = a.allocate_run_id()
    a.append([started(run)])
    b.append([ev.StageStarted(run_id=run, stage="s")])  # a's idea of the tail is stale now
    calls: list[object] = []
    original = a._try_append

    def racing(events, tail, fence=None, guard=None):  # type: ignore[no-untyped-def]
        calls.append(tail)
        if len(calls) == 2:  # b writes again just before a's second attempt
            b.append([ev.StageFinished(run_id=run, stage="s", status="succeeded")])
        return original(events, tail, fence, guard)

    a._try_append = racing  # type: ignore[method-assign]
    a.append([finished(run, "a", "k")])
    report = a.verify()
    a.close()
    b.close()
    assert report.ok and report.events == 4


def a_started_run(tmp_path: Path) -> tuple[SqliteRecord, int]:
    """A new record at ``tmp_path/conveyor.db`` with one run started."""
    db = tmp_path / "conveyor.db"
    ensure_schema(db)
    record = SqliteRecord(db, lambda: "now")
    run = record.allocate_run_id()
    record.append([started(run)])
    return record, run


def test_folding_the_log_empties_it_and_keeps_every_event(tmp_path: Path) -> None:
    record, run = a_started_run(tmp_path)
    for i in range(50):
        record.append([finished(run, f"j{i}", f"k{i}")])
    wal = tmp_path / "conveyor.db-wal"
    assert not record.fold_log(min_bytes=wal.stat().st_size)  # small enough: left as it is
    assert record.fold_log(min_bytes=0)
    assert wal.stat().st_size == 0
    record.append([ev.RunFinished(run_id=run, status="succeeded")])
    report = record.verify()
    record.close()
    assert report.ok and report.events == 52


def test_a_long_run_has_its_log_flushed_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every few unsynced commits, a thread ``fdatasync``s the log (the run's synced end then
    has little left to write); it ends with the record, and a forked child starts its own."""
    from conveyor.store import sqlite as store

    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(store, "_FLUSH_EVERY", 4)
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd) or real(fd))
    record, run = a_started_run(tmp_path)
    db = record.path
    assert record._flusher is None  # short commands never start one
    for i in range(12):
        record.append([finished(run, f"j{i}", f"k{i}")])
    flusher = record._flusher
    assert flusher is not None and flusher.alive()
    deadline = time.monotonic() + 10
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert synced
    assert "conveyor-log-flusher" in {t.name for t in threading.enumerate()}
    monkeypatch.setattr(flusher, "_pid", -1)  # as a forked child sees its parent's
    for i in range(12, 16):
        record.append([finished(run, f"j{i}", f"k{i}")])
    assert record._flusher is not flusher and record._flusher.alive()
    flusher.stop()
    record.append([ev.RunFinished(run_id=run, status="succeeded")])
    record.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        t.name == "conveyor-log-flusher" for t in threading.enumerate()
    ):
        time.sleep(0.01)
    assert all(t.name != "conveyor-log-flusher" for t in threading.enumerate())
    reopened = SqliteRecord(db, lambda: "now")
    report = reopened.verify()
    reopened.close()
    assert report.ok and report.events == 18


def test_no_thread_for_the_flusher_fails_no_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that cannot start a thread (a limit) still commits every event; the flusher's
    descriptor is not left open and it is not tried again."""
    from conveyor.store import sqlite as store

    tries: list[int] = []

    def no_thread(self: threading.Thread) -> None:
        tries.append(1)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(store, "_FLUSH_EVERY", 2)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    record, run = a_started_run(tmp_path)
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(8):
        record.append([finished(run, f"j{i}", f"k{i}")])
    assert len(os.listdir("/proc/self/fd")) == fds
    assert tries == [1] and record._flusher is None
    report = record.verify()
    record.close()
    assert report.ok and report.events == 9


def test_folding_the_log_never_waits_for_a_reader(tmp_path: Path) -> None:
    record, run = a_started_run(tmp_path)
    db = record.path
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)  # a snapshot held
    record.append([finished(run, "a", "k")])  # a frame the reader's snapshot does not see
    assert not record.fold_log(min_bytes=0)  # busy: returns at once, the log stays
    assert (tmp_path / "conveyor.db-wal").stat().st_size > 0
    reader.execute("COMMIT")
    reader.close()
    assert record.fold_log(min_bytes=0)
    assert record.verify().ok
    record.close()


def test_an_unfinished_deployment_is_in_progress_only_while_its_live_deployer_holds_the_lease(
    tmp_path: Path,
) -> None:
    import os
    import socket

    from conveyor.app.deploy import unfinished_deployments

    record, run = a_started_run(tmp_path)
    token, _ = record.acquire_lease(
        "staging",
        "me",
        pid=os.getpid(),
        host=socket.gethostname(),
        ttl_s=60,
        now=100.0,
        holder_gone=lambda pid, host: False,
    )
    deployment = record.allocate_deployment_id()
    record.append(
        [
            de.DeploymentStarted(
                run_id=run,
                deployment_id=deployment,
                environment="staging",
                artifact="app",
                digest="sha256:" + "0" * 64,
                revision="r" * 40,
                actor="me",
                trigger="stage",
                strategy="recreate",
                previous_digest=None,
                previous_deployment=None,
                lease=int(token),
            )
        ]
    )
    assert record.unfinished_deployments_of_run(run)[0]["id"] == deployment
    running, interrupted = unfinished_deployments(record, "staging", now=110.0)
    assert ([r["id"] for r in running], interrupted) == ([deployment], [])
    running, interrupted = unfinished_deployments(record, "staging", now=200.0)  # expired
    assert (running, [r["id"] for r in interrupted]) == ([], [deployment])
    record.release_lease("staging", int(token))
    running, interrupted = unfinished_deployments(record, "staging", now=110.0)
    assert (running, [r["id"] for r in interrupted]) == ([], [deployment])
    assert unfinished_deployments(record, "production") == ([], [])
    record.close()


def test_what_an_environment_runs_follows_its_deployments_ends(tmp_path: Path) -> None:
    """`running`/`down` by what runs; `unknown` when that is uncertain; a stopped release
    stays `stopped` when an interrupted deployment is ended with it as what runs."""
    record, run = a_started_run(tmp_path)

    def deploy(running: int | None, **options: object) -> int:
        deployment = record.allocate_deployment_id()
        record.append(
            [
                de.DeploymentStarted(
                    run_id=run,
                    deployment_id=deployment,
                    environment="staging",
                    artifact="app",
                    digest="sha256:" + "0" * 64,
                    revision="r" * 40,
                    actor="me",
                    trigger="promote",
                    strategy="recreate",
                    previous_digest=None,
                    previous_deployment=None,
                    lease=1,
                ),
                de.DeploymentFinished(
                    run_id=run,
                    deployment_id=deployment,
                    environment="staging",
                    status="interrupted",
                    reason="",
                    health="",
                    duration_s=0.0,
                    running_deployment=running,
                    **options,  # type: ignore[arg-type]
                ),
            ]
        )
        return deployment

    def state() -> tuple[object, object]:
        row = record.environment_state("staging")
        assert row is not None
        return row["deployment"], row["status"]

    first = deploy(1)
    assert state() == (first, "running")
    deploy(first, running_uncertain=True)
    assert state() == (first, "unknown")
    record.append(
        [de.EnvironmentStopped(run_id=run, environment="staging", deployment_id=1, actor="a")]
    )
    assert state() == (first, "stopped")
    deploy(first)  # an interrupted deployment ended by the next deployer
    assert state() == (first, "stopped")
    deploy(None)
    assert state() == (None, "down")
    record.close()


def test_a_deeply_nested_mark_is_no_mark(tmp_path: Path) -> None:
    from conveyor.store.sqlite import SHIPPED, head_path, mark_path, read_head, read_mark

    db = tmp_path / "conveyor.db"
    mark_path(db, SHIPPED).write_text("[" * 3000)
    head_path(db).write_text("[" * 3000)
    assert read_mark(db, SHIPPED) is None
    assert read_head(db) is None
