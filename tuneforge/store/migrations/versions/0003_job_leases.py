"""Job leases (the worker that runs a job and its heartbeat) and a unique idempotency key for creates.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("idempotency_key", sa.String(64), nullable=True))
    op.create_index("ux_jobs_idempotency_key", "jobs", ["idempotency_key"], unique=True)
    op.create_index("ix_checkpoints_job_step", "job_checkpoints", ["job_id", "step"])


def downgrade() -> None:
    op.drop_index("ix_checkpoints_job_step", "job_checkpoints")
    op.drop_index("ux_jobs_idempotency_key", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("idempotency_key")
        batch.drop_column("lease_owner")
