"""The job store keeps each job's typed spec (JobSpec) instead of its bare config.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("spec", sa.JSON(), nullable=True))
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.String),
        sa.column("kind", sa.String),
        sa.column("owner", sa.String),
        sa.column("mlflow_run_id", sa.String),
        sa.column("config", sa.JSON),
        sa.column("spec", sa.JSON),
    )
    connection = op.get_bind()
    for row in connection.execute(sa.select(jobs)).mappings():
        config = row["config"]
        spec = {
            "kind": row["kind"],
            "config": json.loads(config) if isinstance(config, str) else config,
            "job_id": row["id"],
            "owner": row["owner"],
            "mlflow_run_id": row["mlflow_run_id"],
        }
        connection.execute(jobs.update().where(jobs.c.id == row["id"]).values(spec=spec))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("spec", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("config")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("config", sa.JSON(), nullable=True))
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("config", sa.JSON),
                    sa.column("spec", sa.JSON))  # fmt: skip
    connection = op.get_bind()
    for row in connection.execute(sa.select(jobs)).mappings():
        spec = row["spec"]
        spec = json.loads(spec) if isinstance(spec, str) else spec
        connection.execute(
            jobs.update().where(jobs.c.id == row["id"]).values(config=spec["config"])
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("config", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("spec")
