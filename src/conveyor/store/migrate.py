"""Bring a record's schema to the current version with Alembic.

The check is cheap (one query with the stdlib driver); Alembic and SQLAlchemy are imported only
when the schema must change (a new home, or an upgrade of Conveyor).
"""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path

from conveyor.errors import StoreError

HEAD = "0005"
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


def ensure_schema(db_path: Path) -> None:
    """Upgrade the database at ``db_path`` to ``HEAD``, under a file lock."""
    if current_revision(db_path) == HEAD:
        return
    lock_path = db_path.with_name(db_path.name + ".migrate.lock")
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current_revision(db_path) == HEAD:
            return
        if not db_path.exists():
            _create(db_path)
        _upgrade(db_path)


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
    # A creator, not a URL: a path with '?' or '%' in it must not be read as URL syntax.
    engine = create_engine("sqlite://", creator=lambda: sqlite3.connect(str(db_path)))
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except Exception as exc:
        raise StoreError(f"cannot migrate the record at {db_path}: {exc}") from exc
    finally:
        engine.dispose()
