"""Fewer index pages touched by a job's progress: the cache index covers only succeeded jobs,
and attempts lose their status index (recovery finds a run's attempts by the primary key).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("attempts_status", table_name="attempts")
    op.drop_index("jobs_cache", table_name="jobs")
    op.create_index(
        "jobs_cache",
        "jobs",
        ["cache_key", "run_id"],
        sqlite_where=sa.text("status = 'succeeded'"),
        postgresql_where=sa.text("status = 'succeeded'"),
    )


def downgrade() -> None:
    op.drop_index("jobs_cache", table_name="jobs")
    op.create_index("jobs_cache", "jobs", ["cache_key", "status", "run_id"])
    op.create_index("attempts_status", "attempts", ["status"])
