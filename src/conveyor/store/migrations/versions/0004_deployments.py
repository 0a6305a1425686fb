"""Environments and deployments: what runs where, the history, and one lease per environment.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("branch", sa.Text, nullable=False, server_default=""))
    with op.batch_alter_table("stages") as batch:
        batch.add_column(sa.Column("reason", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "deployment_ids",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("allocated_at", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("environment", sa.Text, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("artifact", sa.Text, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("revision", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("trigger", sa.Text, nullable=False),
        sa.Column("strategy", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("health", sa.Text, nullable=False, server_default=""),
        sa.Column("previous_digest", sa.Text),
        sa.Column("previous_deployment", sa.Integer),
        sa.Column("lease", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Text, nullable=False),
        sa.Column("finished_at", sa.Text),
        sa.Column("duration_s", sa.Float),
    )
    op.create_index("deployments_environment", "deployments", ["environment", "id"])
    op.create_index("deployments_digest", "deployments", ["digest"])
    op.create_table(
        "environments",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("deployment", sa.Integer),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("since", sa.Text, nullable=False),
    )
    op.create_table(
        "leases",
        sa.Column("environment", sa.Text, primary_key=True),
        sa.Column("token", sa.Integer, nullable=False),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("holder_pid", sa.Integer),
        sa.Column("holder_host", sa.Text),
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("released", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("environments")
    op.drop_index("deployments_digest", table_name="deployments")
    op.drop_index("deployments_environment", table_name="deployments")
    op.drop_table("deployments")
    op.drop_table("deployment_ids")
    with op.batch_alter_table("stages") as batch:
        batch.drop_column("reason")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("branch")
