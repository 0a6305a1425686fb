"""A job's last attempt lives in the job's row; ``attempts`` keeps only the attempts that were
retried. Each step of a job then writes one read-model row instead of two (no ``attempts`` page
and no page of its primary key in a job's commit), and the run index of the event log leaves
out the two events every job writes (a run's other events are what is looked up by run).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_PER_JOB_EVENTS = "type NOT IN ('job.attempt.started', 'job.finished')"

_MOVED = (
    ("attempt_pid", sa.Integer, "pid"),
    ("attempt_duration_s", sa.Float, "duration_s"),
    ("log_path", sa.Text, "log_path"),
    ("log_bytes", sa.Integer, "log_bytes"),
    ("log_sha256", sa.Text, "log_sha256"),
    ("log_truncated", sa.Integer, "log_truncated"),
)
"""The last attempt's columns of its own; its status, exit code and end are the job's, and its
start too when it is the first (``attempt_started_at`` is null then): rows stay small."""
_SAME_ATTEMPT = "attempts.run_id = jobs.run_id AND attempts.job = jobs.name"
_LAST = (
    "attempts.attempt = (SELECT max(b.attempt) FROM attempts b"
    " WHERE b.run_id = attempts.run_id AND b.job = attempts.job)"
    # Only an attempt whose end is the job's: one that ended before its job did (a retried
    # attempt of a run interrupted before the next began) keeps its own in ``attempts``.
    " AND attempts.attempt = jobs.attempts AND attempts.status IS jobs.status"
    " AND attempts.exit_code IS jobs.exit_code AND attempts.finished_at IS jobs.finished_at"
)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("attempt_started_at", sa.Text))
    for column, kind, _ in _MOVED:
        op.add_column("jobs", sa.Column(column, kind))
    targets = ", ".join(column for column, _, _ in _MOVED)
    sources = ", ".join(f"attempts.{source}" for _, _, source in _MOVED)
    op.execute(
        f"UPDATE jobs SET (attempt_started_at, {targets}) ="
        f" (SELECT NULLIF(attempts.started_at, jobs.started_at), {sources} FROM attempts"
        f" WHERE {_SAME_ATTEMPT} AND {_LAST})"
        f" WHERE EXISTS (SELECT 1 FROM attempts WHERE {_SAME_ATTEMPT} AND {_LAST})"
    )
    op.execute(
        f"DELETE FROM attempts WHERE EXISTS (SELECT 1 FROM jobs WHERE {_SAME_ATTEMPT} AND {_LAST})"
    )
    op.drop_index("events_run", table_name="events")
    op.create_index(
        "events_run",
        "events",
        ["run_id", "seq"],
        sqlite_where=sa.text(_PER_JOB_EVENTS),
        postgresql_where=sa.text(_PER_JOB_EVENTS),
    )


def downgrade() -> None:
    op.drop_index("events_run", table_name="events")
    op.create_index("events_run", "events", ["run_id", "seq"])
    sources = ", ".join(column for column, _, _ in _MOVED)
    targets = ", ".join(source for _, _, source in _MOVED)
    op.execute(
        "INSERT INTO attempts (run_id, job, attempt, status, exit_code, started_at, finished_at,"
        f" {targets}) SELECT run_id, name, attempts, status, exit_code,"
        f" COALESCE(attempt_started_at, started_at), finished_at, {sources} FROM jobs"
        " WHERE log_path IS NOT NULL AND NOT EXISTS (SELECT 1 FROM attempts"
        f" WHERE {_SAME_ATTEMPT} AND attempts.attempt = jobs.attempts)"
    )
    with op.batch_alter_table("jobs") as batch:
        for column, _, _ in reversed(_MOVED):
            batch.drop_column(column)
        batch.drop_column("attempt_started_at")
