"""The DORA facts read from a real record: the unit test's history, written with plain SQL."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from conveyor.domain.dora import DoraInputs, iso
from conveyor.errors import StoreError
from conveyor.store.metrics import _lead_times, connect_read_only, dora_inputs, metrics
from conveyor.store.migrate import ensure_schema
from tests.contract.test_migrations import upgrade_to
from tests.unit.test_dora import EXPECTED, HISTORY, INCIDENTS, INPUTS, SINCE, UNTIL, Row


def insert(conn: sqlite3.Connection, rows: list[Row]) -> None:
    for row in rows:
        finished = None if row.finished is None else iso(row.finished)
        conn.execute(
            "INSERT INTO deployments (id, environment, run_id, artifact, digest, revision,"
            " actor, trigger, strategy, status, previous_digest, previous_deployment, lease,"
            " started_at, finished_at, duration_s, hotfix, overridden, started_epoch,"
            " finished_epoch) VALUES (?, ?, ?, 'app', ?, ?, 'ann', 'promote', 'recreate', ?,"
            " NULL, NULL, ?, ?, ?, 60.0, ?, ?, ?, ?)",
            (
                row.id,
                row.environment,
                row.id,
                f"sha256:{row.id:064x}",
                f"{row.id:040x}",
                row.status,
                row.id,
                iso((row.finished or SINCE) - 60.0),
                finished,
                int(row.hotfix),
                int(row.overridden),
                (row.finished or SINCE) - 60.0,
                row.finished,
            ),
        )
        conn.executemany(
            'INSERT INTO deployment_commits (deployment_id, "commit", committed_epoch)'
            " VALUES (?, ?, ?)",
            [(row.id, commit, at) for commit, at in row.commits],
        )


def build(db: Path) -> Path:
    ensure_schema(db)
    conn = sqlite3.connect(db)
    with conn:
        insert(conn, HISTORY)
        conn.executemany(
            "INSERT INTO incidents (id, environment, deployment_id, title, opened_by, opened_at,"
            " opened_epoch, resolved_by, resolved_at, resolved_epoch)"
            " VALUES (?, ?, ?, 'down', 'ann', ?, ?, ?, ?, ?)",
            [
                (i, env, dep, iso(opened), opened, None, None, None)
                if resolved is None
                else (i, env, dep, iso(opened), opened, "bob", iso(resolved), resolved)
                for i, env, dep, opened, resolved in INCIDENTS
            ],
        )
    conn.close()
    return db


@pytest.fixture
def record(tmp_path: Path) -> Path:
    return build(tmp_path / "conveyor.db")


def sorted_inputs(inputs: DoraInputs) -> DoraInputs:
    return replace(
        inputs,
        deployments=sorted(inputs.deployments, key=lambda d: d.id),
        incidents=sorted(inputs.incidents, key=lambda i: i.id),
        lead_times_s=sorted(inputs.lead_times_s),
    )


def test_metrics_of_the_record_are_the_hand_computed_document(record: Path) -> None:
    assert metrics(record, "production", SINCE, UNTIL) == EXPECTED


def test_the_facts_read_are_the_hand_written_ones(record: Path) -> None:
    conn = connect_read_only(record)
    try:
        assert sorted_inputs(dora_inputs(conn, "production", SINCE, UNTIL)) == sorted_inputs(INPUTS)
    finally:
        conn.close()


@pytest.mark.parametrize(("since", "until"), [(SINCE, UNTIL), (SINCE - 86400.0, UNTIL + 1.0)])
def test_both_lead_time_plans_read_the_same_commits(
    record: Path, since: float, until: float
) -> None:
    conn = connect_read_only(record)
    try:
        window = ("production", since, until)
        by_commit = _lead_times(conn, window, by_commit=True)
        by_deployment = _lead_times(conn, window, by_commit=False)
    finally:
        conn.close()
    assert sorted(by_commit) == sorted(by_deployment)
    assert len(by_commit) == (10 if since == SINCE else 12)  # + c0 (day -1) and c11 (`until`)


def test_a_narrow_window_and_another_environment(record: Path) -> None:
    # Day 5 to 7 holds production 8 only (staging 7 is elsewhere): 1 success, lead times 20 and
    # 30 h (median rank 1 -> 20, p90 rank 2 -> 30); incident 1 (1.5 h) makes it a failed change.
    doc = metrics(record, "production", SINCE + 5 * 86400.0, SINCE + 7 * 86400.0)
    assert (doc["deployments"], doc["attempted_deployments"]) == (1, 1)
    assert doc["lead_time_hours"] == {"median": 20.0, "p90": 30.0, "commits": 2, "skewed": 0}
    assert doc["change_failure_rate"] == 1.0
    assert doc["recovery_time_hours"] == {"median": 1.5, "count": 1, "unrecovered": 0, "skewed": 0}
    # Staging over the whole window: deployment 7, its commits made 8 and 18 h before it;
    # incident 5 (resolved in 1 h) names it: a failed change.
    doc = metrics(record, "staging", SINCE, UNTIL)
    assert (doc["deployments"], doc["attempted_deployments"]) == (1, 1)
    assert doc["lead_time_hours"] == {"median": 8.0, "p90": 18.0, "commits": 2, "skewed": 0}
    assert doc["change_failure_rate"] == 1.0
    assert doc["recovery_time_hours"] == {"median": 1.0, "count": 1, "unrecovered": 0, "skewed": 0}


def test_an_empty_record(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    ensure_schema(db)
    doc = metrics(db, "production", SINCE, UNTIL)
    assert (doc["deployments"], doc["attempted_deployments"]) == (0, 0)
    assert doc["lead_time_hours"]["commits"] == 0


def test_reading_does_not_write(record: Path) -> None:
    before = {p.name: p.read_bytes() for p in record.parent.iterdir() if p.is_file()}
    metrics(record, "production", SINCE, UNTIL)
    after = {p.name: p.read_bytes() for p in record.parent.iterdir() if p.is_file()}
    assert after["conveyor.db"] == before["conveyor.db"]
    conn = connect_read_only(record)
    try:
        with pytest.raises(sqlite3.OperationalError):
            conn.execute("DELETE FROM deployments")
    finally:
        conn.close()


def test_a_writer_does_not_block_the_reader(record: Path) -> None:
    writer = sqlite3.connect(record, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("DELETE FROM deployments")  # not committed: the reader does not see it
        assert metrics(record, "production", SINCE, UNTIL) == EXPECTED
        writer.execute("ROLLBACK")
    finally:
        writer.close()


def test_a_path_that_needs_quoting_in_a_uri(record: Path) -> None:
    folder = record.parent / "my home #1 ?%20"
    folder.mkdir()
    # built elsewhere: ensure_schema's SQLAlchemy URL does not quote '?' or '%'
    moved = record.rename(folder / "conveyor.db")
    assert metrics(moved, "production", SINCE, UNTIL) == EXPECTED


def test_no_record(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no record"):
        metrics(tmp_path / "conveyor.db", "production", SINCE, UNTIL)
    assert not (tmp_path / "conveyor.db").exists()


def test_a_record_older_than_the_dora_tables(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    upgrade_to(db, "0004")
    with pytest.raises(StoreError, match="cannot read the DORA facts") as info:
        metrics(db, "production", SINCE, UNTIL)
    assert info.value.hint is not None


def test_an_empty_window_is_refused_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="end after it starts"):
        metrics(tmp_path / "missing.db", "production", UNTIL, SINCE)
