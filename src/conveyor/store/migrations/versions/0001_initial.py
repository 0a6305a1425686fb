"""The initial record: hash-linked events and the run read models.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Text, nullable=False),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.Text, nullable=False),
        sa.Column("hash", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("events_run", "events", ["run_id", "seq"])
    op.execute(
        "CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events"
        " BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END"
    )
    op.execute(
        "CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events"
        " BEGIN SELECT RAISE(ABORT, 'the event log is append-only'); END"
    )
    op.create_table(
        "run_ids",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("allocated_at", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("revision", sa.Text, nullable=False),
        sa.Column("pipeline_file", sa.Text, nullable=False),
        sa.Column("pipeline_digest", sa.Text, nullable=False),
        sa.Column("dirty", sa.Integer, nullable=False, server_default="0"),
        sa.Column("actor", sa.Text, nullable=False, server_default=""),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("started_at", sa.Text),
        sa.Column("finished_at", sa.Text),
        sa.Column("owner_pid", sa.Integer),
        sa.Column("owner_host", sa.Text),
        sa.Column("owner_token", sa.Text),
    )
    op.create_index("runs_status", "runs", ["status"])
    op.create_table(
        "stages",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("started_at", sa.Text),
        sa.Column("finished_at", sa.Text),
        sa.PrimaryKeyConstraint("run_id", "name"),
    )
    op.create_table(
        "jobs",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("idx", sa.Integer, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.Text),
        sa.Column("finished_at", sa.Text),
        sa.Column("duration_s", sa.Float),
        sa.Column("cache_key", sa.Text),
        sa.Column("cached_from_run", sa.Integer),
        sa.Column("cached_from_job", sa.Text),
        sa.Column("cached_from_attempt", sa.Integer),
        sa.Column("reason", sa.Text),
        sa.Column("tests_passed", sa.Integer),
        sa.Column("tests_failed", sa.Integer),
        sa.Column("tests_skipped", sa.Integer),
        sa.PrimaryKeyConstraint("run_id", "name"),
    )
    op.create_table(
        "attempts",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("job", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("pid", sa.Integer),
        sa.Column("started_at", sa.Text),
        sa.Column("finished_at", sa.Text),
        sa.Column("duration_s", sa.Float),
        sa.Column("log_path", sa.Text),
        sa.Column("log_bytes", sa.Integer),
        sa.Column("log_sha256", sa.Text),
        sa.Column("log_truncated", sa.Integer),
        sa.PrimaryKeyConstraint("run_id", "job", "attempt"),
    )
    op.create_index("attempts_status", "attempts", ["status"])
    op.create_table(
        "test_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("job", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("classname", sa.Text, nullable=False),
        sa.Column("file", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("duration_s", sa.Float),
        sa.Column("message", sa.Text),
    )
    op.create_index("test_results_run", "test_results", ["run_id", "job"])
    op.create_index("test_results_name", "test_results", ["classname", "name"])
    # The job cache is the jobs that succeeded, looked up by cache key (latest run first).
    op.create_index("jobs_cache", "jobs", ["cache_key", "status", "run_id"])


def downgrade() -> None:
    for table in ("test_results", "attempts", "jobs", "stages", "runs", "run_ids"):
        op.drop_table(table)
    op.execute("DROP TRIGGER IF EXISTS events_append_only_update")
    op.execute("DROP TRIGGER IF EXISTS events_append_only_delete")
    op.drop_table("events")
