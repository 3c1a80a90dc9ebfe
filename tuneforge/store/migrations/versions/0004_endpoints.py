"""Dedicated endpoints, the adapters they also serve, and their events.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("name", sa.String(400), nullable=False, unique=True),
        sa.Column("display_name", sa.String(400), nullable=False),
        sa.Column("model", sa.String(400), nullable=False),
        sa.Column("hardware", sa.String(100), nullable=False),
        sa.Column("min_replicas", sa.Integer, nullable=False),
        sa.Column("max_replicas", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("inactive_timeout", sa.Integer, nullable=True),
        sa.Column("replica_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_endpoints_owner_created", "endpoints", ["owner", "created_at"])
    op.create_table(
        "endpoint_adapters",
        sa.Column("endpoint_id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(400), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "endpoint_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("endpoint_id", sa.String(64), nullable=False, index=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("endpoint_events")
    op.drop_table("endpoint_adapters")
    op.drop_index("ix_endpoints_owner_created", "endpoints")
    op.drop_table("endpoints")
