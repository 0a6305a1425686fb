"""Bring a record's schema to the current version with Alembic.

The check is cheap (one query with the stdlib driver); Alembic and SQLAlchemy are imported only
when the schema must change (a new home, or an upgrade of Conveyor).
"""

from __future__ import annotations

import fcntl
import sqlite3
from collections.abc import Callable
from pathlib import Path

from conveyor.errors import StoreError
from conveyor.signals import signals_held

HEAD = "0006"
"""The newest migration; update it with every new file in ``migrations/versions``."""


def current_revision(db_path: Path) -> str | None:
    """The schema revision recorded in the database, or ``None`` for a new one."""
    if not db_path.exists():
        return None
    try:
        conn = sqlite3.connect(str(db_path))
        try:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return None
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"{db_path} is not a Conveyor record: {exc}",
            hint="point --home at another folder, or move the file away",
        ) from exc
    return row[0] if row else None


MOVES_ROWS = "0006"
"""The newest migration that moves rows an older Conveyor's running command still writes the
old way (0006: a job's last attempt into the job's row). No record is taken past it while a
run of an older Conveyor is going: that run's next writes would miss what was moved."""


def ensure_schema(db_path: Path, live_runs: Callable[[], list[int]] | None = None) -> None:
    """Upgrade the database at ``db_path`` to ``HEAD``, under a file lock.

    The whole upgrade is one transaction, and Ctrl-C or SIGTERM during it takes effect when it
    has ended: an interrupted first command leaves no half-made record behind. ``live_runs``
    names the runs whose owner still runs: an upgrade past ``MOVES_ROWS`` waits for them.
    """
    if current_revision(db_path) == HEAD:
        return
    lock_path = db_path.with_name(db_path.name + ".migrate.lock")
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = current_revision(db_path)
        if current == HEAD:
            return
        if current is not None and current < MOVES_ROWS and live_runs is not None:
            running = live_runs()
            if running:
                raise StoreError(
                    f"run {running[0]} of an older Conveyor is still going in this home: its"
                    f" record can be upgraded (schema {current} to {HEAD}) when it has ended",
                    hint=f"wait for run {running[0]} to end (or stop it), then run this"
                    " command again",
                )
        with signals_held():
            if db_path.exists() and _half_made(db_path):
                _clear(db_path)  # left by an interrupted first command of an older Conveyor
            if not db_path.exists():
                _create(db_path)
            _upgrade(db_path)


OWN_TABLES = frozenset(
    {
        "alembic_version", "allocations", "approvals", "artifacts", "attempts",
        "deployment_commits", "deployment_ids", "deployments", "environments", "events",
        "gate_verdicts", "incidents", "jobs", "leases", "overrides", "reports", "run_ids", "runs",
        "sqlite_sequence", "stages", "test_results", "users",
    }
)  # fmt: skip
"""Every table the migrations create (a test keeps it so)."""


def _half_made(db_path: Path) -> bool:
    """A record with some of Conveyor's tables (and no other), but no schema version and no
    event: a first migration that an older Conveyor did not finish (its tables were created
    one transaction each). Another program's database is never taken for one."""
    try:
        conn = sqlite3.connect(str(db_path))
        try:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {row[0] for row in rows}
            if not tables <= OWN_TABLES:
                return False
            if (
                "alembic_version" in tables
                and conn.execute("SELECT 1 FROM alembic_version").fetchone()
            ):
                return False
            return "events" not in tables or not conn.execute("SELECT 1 FROM events").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return False  # not ours to repair: the upgrade says what is wrong


def _clear(db_path: Path) -> None:
    """Drop every table of a half-made record, in place (a caller may hold it open)."""
    try:
        conn = sqlite3.connect(str(db_path), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            names = conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
            for (name,) in names:
                conn.execute(f'DROP TABLE "{name.replace(chr(34), chr(34) * 2)}"')
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot repair the half-made record at {db_path}: {exc}") from exc


PAGE_SIZE = 1024
"""Bytes per database page. A job's progress is a small transaction touching a few pages of
several tables and indexes; small pages make each commit write less to the WAL (measured: about
a quarter less time per commit than 4096). Only a new database takes it."""


def _create(db_path: Path) -> None:
    try:
        conn = sqlite3.connect(str(db_path))
        try:
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode=WAL")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot create the record at {db_path}: {exc}") from exc


def _upgrade(db_path: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    from sqlalchemy import event

    # A creator, not a URL: a path with '?' or '%' in it must not be read as URL syntax.
    # The driver in autocommit mode and an explicit BEGIN: the stdlib driver would otherwise
    # commit each CREATE TABLE on its own (SQLAlchemy's "transactional DDL" recipe for pysqlite).
    engine = create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(str(db_path), isolation_level=None)
    )
    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except Exception as exc:
        detail = getattr(exc, "orig", None) or exc  # the driver's words, without SQLAlchemy's
        raise StoreError(
            f"cannot migrate the record at {db_path}: {detail}",
            hint="the record was left as it was; if another program changed its tables, point"
            " --home at a new folder",
        ) from exc
    finally:
        engine.dispose()
