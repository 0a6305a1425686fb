"""Migrations: every revision upgrades a database that holds data, without losing any."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine

from conveyor.domain import events as ev
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
        "INSERT INTO runs (id, pipeline, revision, pipeline_file, pipeline_digest, status)"
        " VALUES (1, 'p', 'r', 'conveyor.yml', 'd', 'running')"
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
