"""Gates, approvals, overrides, users, incidents, and the commits each deployment shipped.

Times used by the DORA metrics are also kept as epoch seconds (``*_epoch``) so that a history of
a million commits is aggregated by SQLite without parsing text.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "allocations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("at", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("hotfix", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("overridden", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("started_epoch", sa.Float))
        batch.add_column(sa.Column("finished_epoch", sa.Float))
    op.create_index(
        "deployments_environment_finished", "deployments", ["environment", "finished_epoch"]
    )
    op.create_table(
        "deployment_commits",
        sa.Column("deployment_id", sa.Integer, nullable=False),
        sa.Column("commit", sa.Text, nullable=False),
        sa.Column("committed_epoch", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("deployment_id", "commit"),
    )
    op.create_table(
        "users",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("added_at", sa.Text, nullable=False),
        sa.Column("added_by", sa.Text, nullable=False),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("environment", sa.Text, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("approver", sa.Text, nullable=False),
        sa.Column("roles", sa.Text, nullable=False),
        sa.Column("comment", sa.Text, nullable=False, server_default=""),
        sa.Column("at", sa.Text, nullable=False),
    )
    op.create_index("approvals_target", "approvals", ["environment", "digest"])
    op.create_table(
        "overrides",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("environment", sa.Text, nullable=False),
        sa.Column("gate", sa.Text, nullable=False),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("created_epoch", sa.Float, nullable=False),
        sa.Column("expires_epoch", sa.Float, nullable=False),
        sa.Column("needs_confirmation", sa.Integer, nullable=False, server_default="0"),
        sa.Column("confirmed_by", sa.Text),
        sa.Column("confirmed_at", sa.Text),
        sa.Column("used", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_index("overrides_target", "overrides", ["environment", "digest", "gate"])
    op.create_table(
        "gate_verdicts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("environment", sa.Text, nullable=False, server_default=""),
        sa.Column("stage", sa.Text, nullable=False, server_default=""),
        sa.Column("digest", sa.Text, nullable=False, server_default=""),
        sa.Column("gate", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("verdict", sa.Text, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
        sa.Column("evidence", sa.Text, nullable=False),
        sa.Column("override_id", sa.Integer),
        sa.Column("at", sa.Text, nullable=False),
    )
    op.create_index("gate_verdicts_environment", "gate_verdicts", ["environment", "id"])
    op.create_index("gate_verdicts_run", "gate_verdicts", ["run_id", "id"])
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("environment", sa.Text, nullable=False),
        sa.Column("deployment_id", sa.Integer),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("opened_by", sa.Text, nullable=False),
        sa.Column("opened_at", sa.Text, nullable=False),
        sa.Column("opened_epoch", sa.Float, nullable=False),
        sa.Column("resolved_by", sa.Text),
        sa.Column("resolved_at", sa.Text),
        sa.Column("resolved_epoch", sa.Float),
    )
    op.create_index("incidents_environment", "incidents", ["environment", "opened_epoch"])
    op.create_table(
        "reports",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("job", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "kind", "path"),
    )


def downgrade() -> None:
    op.drop_table("reports")
    op.drop_table("allocations")
    op.drop_index("incidents_environment", table_name="incidents")
    op.drop_table("incidents")
    op.drop_index("gate_verdicts_run", table_name="gate_verdicts")
    op.drop_index("gate_verdicts_environment", table_name="gate_verdicts")
    op.drop_table("gate_verdicts")
    op.drop_index("overrides_target", table_name="overrides")
    op.drop_table("overrides")
    op.drop_index("approvals_target", table_name="approvals")
    op.drop_table("approvals")
    op.drop_table("users")
    op.drop_table("deployment_commits")
    op.drop_index("deployments_environment_finished", table_name="deployments")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("finished_epoch")
        batch.drop_column("started_epoch")
        batch.drop_column("overridden")
        batch.drop_column("hotfix")
