"""batches: the batches table, jobs' custom_id, the fair-pick and batch indexes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from vramq.jobs.schema import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("caller", sa.String(80), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("webhook", sa.JSON, nullable=True),
        sa.Column("input_file", sa.String(40), nullable=True),
        sa.Column("base_url", sa.String(300), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("canceled_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
        sa.Column("results_key", sa.String(200), nullable=True),
    )
    op.create_index("ix_batches_caller_created", "batches", ["caller", "created_at"])
    op.create_index("ix_batches_open", "batches", ["finished_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("custom_id", sa.String(64), nullable=True))
    op.create_index("ix_jobs_fair", "jobs", ["model", "priority", "status", "caller", "created_at", "id"])
    op.create_index("ix_jobs_model_status_caller", "jobs", ["model", "status", "caller"])
    op.create_index("ix_jobs_batch", "jobs", ["batch_id", "status"])
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(40), nullable=True))
    op.create_index("ix_webhook_deliveries_batch_id", "webhook_deliveries", ["batch_id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_batch_id", "webhook_deliveries")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("batch_id")
    op.drop_index("ix_jobs_batch", "jobs")
    op.drop_index("ix_jobs_model_status_caller", "jobs")
    op.drop_index("ix_jobs_fair", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("custom_id")
    op.drop_index("ix_batches_open", "batches")
    op.drop_index("ix_batches_caller_created", "batches")
    op.drop_table("batches")
