"""Artifacts: what each job of each run published, by name and digest, with its provenance.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("job", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("provenance", sa.Text, nullable=False),
        sa.Column("source_run", sa.Integer),
        sa.Column("published_at", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "name"),
    )
    op.create_index("artifacts_digest", "artifacts", ["digest"])


def downgrade() -> None:
    op.drop_index("artifacts_digest", table_name="artifacts")
    op.drop_table("artifacts")
