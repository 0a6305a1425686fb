"""Migrations: every revision upgrades a database that holds data, without losing any."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from conveyor.domain import events as ev
from conveyor.errors import StoreError
from conveyor.signals import signals_held
from conveyor.store import migrate
from conveyor.store.migrate import HEAD, current_revision, ensure_schema
from conveyor.store.sqlite import GENESIS, SqliteRecord, canonical, event_hash
from tests.contract.test_record import finished, started

NOW = "2026-01-01T00:00:00.000000Z"


def upgrade_to(db: Path, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(Path(migrate.__file__).parent / "migrations"))
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    engine.dispose()


def test_head_is_the_newest_migration() -> None:
    versions = Path(migrate.__file__).parent / "migrations" / "versions"
    newest = max(p.name.split("_", 1)[0] for p in versions.glob("[0-9]*.py"))
    assert newest == HEAD


def test_upgrade_from_the_first_revision_keeps_the_record(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    upgrade_to(db, "0001")
    # Data as the first release wrote it (its own SQL: today's code writes newer columns).
    run = 1
    conn = sqlite3.connect(db)
    prev = GENESIS
    for seq, event in enumerate([started(run), finished(run, "a", "k1")], start=1):
        payload = canonical(event.payload())
        digest = event_hash(prev, seq, NOW, event.kind, run, payload)
        conn.execute(
            "INSERT INTO events (seq, at, type, run_id, payload, prev_hash, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, NOW, event.kind, run, payload, prev, digest),
        )
        prev = digest
    conn.execute(
        "INSERT INTO runs (id, pipeline, revision, pipeline_file, pipeline_digest, status,"
        " started_at) VALUES (1, 'p', 'r', 'conveyor.yml', 'd', 'running', ?)",
        (NOW,),
    )
    conn.execute(
        "INSERT INTO jobs (run_id, idx, name, stage, status, attempts, cache_key)"
        " VALUES (1, 0, 'a', 's', 'succeeded', 1, 'k1')"
    )
    conn.commit()
    conn.close()

    ensure_schema(db)

    assert current_revision(db) == HEAD
    record = SqliteRecord(db, lambda: NOW)
    try:
        assert record.verify().ok
        assert record.get_run(run)["status"] == "running"
        hit = record.find_cache("k1")
        assert hit is not None and hit.run_id == run
        record.append([ev.RunFinished(run_id=run, status="succeeded")])
        assert record.verify().ok
    finally:
        record.close()
    plan = sqlite3.connect(db).execute(
        "EXPLAIN QUERY PLAN SELECT run_id FROM jobs WHERE cache_key = 'k1'"
        " AND status = 'succeeded' ORDER BY run_id DESC LIMIT 1"
    )
    assert "jobs_cache" in " ".join(str(row) for row in plan)


def test_opening_an_old_record_upgrades_it_under_the_open_connection(tmp_path: Path) -> None:
    from conveyor.adapters.home import Home
    from conveyor.bootstrap import open_record

    home = Home(tmp_path / "home")
    home.ensure()
    upgrade_to(home.database, "0003")
    record = open_record(home)  # opened first, then migrated to HEAD by Alembic
    try:
        assert current_revision(home.database) == HEAD
        run = record.allocate_run_id()
        record.append([started(run), finished(run, "a", "k1")])
        record.append([ev.RunFinished(run_id=run, status="succeeded")])
        assert record.verify().ok
        doc = record.get_run(run)
        assert doc is not None and doc["status"] == "succeeded"
    finally:
        record.close()


def test_the_last_attempts_move_into_their_jobs_rows(tmp_path: Path) -> None:
    """0006: a job's last attempt is kept in its row; the retried ones stay in ``attempts``."""
    db = tmp_path / "conveyor.db"
    upgrade_to(db, "0005")
    conn = sqlite3.connect(db)
    conn.executemany(
        "INSERT INTO jobs (run_id, idx, name, stage, status, attempts, exit_code, started_at,"
        " finished_at) VALUES (1, ?, ?, 's', ?, ?, ?, 't0', ?)",
        [
            (0, "a", "succeeded", 2, 0, "t2"),
            (1, "b", "running", 1, None, None),
            (2, "c", "cached", 0, 0, "t0"),
            (3, "d", "interrupted", 1, None, "t9"),  # interrupted between two attempts
        ],
    )
    conn.executemany(
        "INSERT INTO attempts (run_id, job, attempt, status, exit_code, pid, started_at,"
        " finished_at, duration_s, log_path, log_bytes, log_sha256, log_truncated)"
        " VALUES (1, ?, ?, ?, ?, 7, ?, ?, 0.5, ?, 10, 'h', 0)",
        [
            ("a", 1, "failed", 1, "t0", "t1", "logs/1/a.1.log"),
            ("a", 2, "succeeded", 0, "t1", "t2", "logs/1/a.2.log"),
            ("b", 1, "running", None, "t0", None, "logs/1/b.1.log"),
            ("d", 1, "failed", 1, "t0", "t3", "logs/1/d.1.log"),
        ],
    )
    conn.commit()
    conn.close()

    ensure_schema(db)

    record = SqliteRecord(db, lambda: NOW)
    try:
        a = record.attempts(1, "a")
        assert [(t["attempt"], t["status"], t["exit_code"], t["log"]) for t in a] == [
            (1, "failed", 1, "logs/1/a.1.log"),
            (2, "succeeded", 0, "logs/1/a.2.log"),
        ]
        assert [(t["started_at"], t["finished_at"]) for t in a] == [("t0", "t1"), ("t1", "t2")]
        assert a[1]["pid"] == 7 and a[1]["log_bytes"] == 10
        (b,) = record.attempts(1, "b")
        assert (b["status"], b["started_at"], b["finished_at"]) == ("running", "t0", None)
        assert record.attempts(1, "c") == []
        (d,) = record.attempts(1, "d")  # its end is its own, not the job's: left where it was
        assert (d["status"], d["exit_code"], d["finished_at"]) == ("failed", 1, "t3")
    finally:
        record.close()
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT job, attempt FROM attempts ORDER BY job").fetchall()
    assert rows == [("a", 1), ("d", 1)]
    (index,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'events_run'").fetchone()
    assert "WHERE type NOT IN ('job.attempt.started', 'job.finished')" in index
    conn.close()


def test_rows_are_not_moved_under_a_running_older_conveyor(tmp_path: Path) -> None:
    """An older Conveyor still running a run would write its attempts the old way after 0006
    moved them: the upgrade waits while a run's lock is held (by a live `conveyor run`); an
    orphan's lock file left behind, or a run without one, does not hold it up."""
    import os

    from conveyor.adapters.home import Home
    from conveyor.adapters.processes import acquire_run_lock
    from conveyor.bootstrap import open_record

    home = Home(tmp_path / "home")
    home.ensure()
    upgrade_to(home.database, "0005")
    conn = sqlite3.connect(home.database)
    conn.executemany(
        "INSERT INTO runs (id, pipeline, revision, pipeline_file, pipeline_digest, status,"
        " started_at, owner_pid, owner_host) VALUES (?, 'p', 'r', 'f', 'd', 'running', ?, ?, ?)",
        [(1, NOW, os.getpid(), os.uname().nodename), (2, NOW, 1, os.uname().nodename)],
    )
    conn.commit()
    conn.close()
    lock = acquire_run_lock(home.locks, 1)  # run 1's `conveyor run` is still going
    (home.locks / "run-2.lock").touch()  # run 2's process died and left its lock file
    try:
        with pytest.raises(StoreError, match="run 1 of an older Conveyor is still going") as e:
            open_record(home, recover=False)
        assert "wait for run 1 to end" in (e.value.hint or "")
        assert current_revision(home.database) == "0005"
        assert (home.locks / "run-2.lock").exists()  # only looked at
    finally:
        lock.handle.close()
    record = open_record(home)
    try:
        assert current_revision(home.database) == HEAD
        # Both owners are gone now (run 1's pid is ours, but it no longer holds the lock).
        assert record.get_run(2)["status"] == "interrupted"
    finally:
        record.close()


def test_a_failed_migration_leaves_no_table_behind(tmp_path: Path) -> None:
    """The whole upgrade is one transaction: the stdlib driver would commit each CREATE TABLE."""
    db = tmp_path / "conveyor.db"
    migrate._create(db)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE artifacts (x)")  # migration 0003 will fail on it
    with pytest.raises(StoreError) as info:
        migrate._upgrade(db)
    assert "table artifacts already exists" in info.value.message
    assert "sqlalche.me" not in info.value.message and info.value.hint
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"artifacts"}


def test_a_record_an_interrupted_first_command_left_half_made_is_made_again(
    tmp_path: Path,
) -> None:
    db = tmp_path / "conveyor.db"
    with sqlite3.connect(db) as conn:  # tables, no version, no event: what older releases left
        conn.execute("CREATE TABLE events (seq INTEGER)")
        conn.execute("CREATE TABLE runs (id INTEGER)")
    ensure_schema(db)
    assert current_revision(db) == HEAD
    SqliteRecord(db, lambda: NOW).append([started(1)])


def test_a_record_with_events_but_no_version_is_not_thrown_away(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE events (seq INTEGER)")
        conn.execute("INSERT INTO events VALUES (1)")
    with pytest.raises(StoreError):
        ensure_schema(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT seq FROM events").fetchall() == [(1,)]


def test_ctrl_c_during_a_migration_takes_effect_when_it_has_ended(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    # Python's own Ctrl-C handler, whatever this process inherited (a job started in the
    # background by a shell without job control ignores SIGINT).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), signals_held():
            signal.raise_signal(signal.SIGINT)  # to this thread: xdist's workers have others
            migrate._create(db)
            migrate._upgrade(db)  # not interrupted half-way
        assert current_revision(db) == HEAD
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("tables", [(), ("events", "runs")])
def test_opening_a_half_made_record_makes_it_again_under_the_open_connection(
    tmp_path: Path, tables: tuple[str, ...]
) -> None:
    """Killed after the file was created (no table) or half-way through an older release's
    migration: the next command opens it, then finds it half made."""
    from conveyor.adapters.home import Home
    from conveyor.bootstrap import open_record

    home = Home(tmp_path / "home")
    home.ensure()
    migrate._create(home.database)
    with sqlite3.connect(home.database) as conn:
        for name in tables:
            conn.execute(f"CREATE TABLE {name} (x)")
    record = open_record(home)
    assert record.list_runs(10) == []


def test_own_tables_are_the_tables_the_migrations_create(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    ensure_schema(db)
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == migrate.OWN_TABLES


def test_another_programs_database_is_not_taken_for_a_half_made_record(tmp_path: Path) -> None:
    db = tmp_path / "conveyor.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (name TEXT)")
        conn.execute("INSERT INTO customers VALUES ('alice')")
    ensure_schema(db)  # Conveyor's tables beside it, as before; nothing dropped
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM customers").fetchall() == [("alice",)]
