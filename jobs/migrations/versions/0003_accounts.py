"""accounts, token ledger, shares, retention

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from vramq.jobs.schema import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(120), nullable=True),
        sa.Column("tier", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "wallets",
        sa.Column("holder", sa.String(80), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("used", sa.BigInteger, nullable=False),
        sa.Column("balance", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "ledger",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("holder", sa.String(80), nullable=False),
        sa.Column("entry", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(40), nullable=True),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("allowance_delta", sa.BigInteger, nullable=False),
        sa.Column("balance_delta", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.UniqueConstraint("job_id", "entry", name="uq_ledger_job_entry"),
    )
    op.create_index("ix_ledger_holder_day", "ledger", ["holder", "day"])
    op.create_table(
        "shares",
        sa.Column("token", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("revoked_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_shares_job_id", "shares", ["job_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("work_units", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("price_rate", sa.Float, nullable=False, server_default="0"))
        batch.add_column(sa.Column("min_tokens", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("outputs_expired_at", UTCDateTime, nullable=True))
        batch.create_index("ix_jobs_expires", ["expires_at"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_expires")
        batch.drop_column("outputs_expired_at")
        batch.drop_column("min_tokens")
        batch.drop_column("price_rate")
        batch.drop_column("work_units")
    op.drop_index("ix_shares_job_id", "shares")
    op.drop_table("shares")
    op.drop_index("ix_ledger_holder_day", "ledger")
    op.drop_table("ledger")
    op.drop_table("wallets")
    op.drop_table("accounts")
