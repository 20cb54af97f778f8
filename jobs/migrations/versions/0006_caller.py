"""caller: one name for the paying party (wallets.holder, ledger.holder,
webhook_deliveries.holder and idempotency_keys.scope become ``caller``, as in jobs,
batches and files; the index ix_ledger_holder_day becomes ix_ledger_caller_day)

The values stay as they are. An idempotency key of an admin's credit is stored under
``credit:<account id>`` (a namespace of its own, apart from the account's own keys):
that value moves into ``caller`` unchanged.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# (table, old column name, new column name)
RENAMES = [
    ("wallets", "holder", "caller"),
    ("ledger", "holder", "caller"),
    ("webhook_deliveries", "holder", "caller"),
    ("idempotency_keys", "scope", "caller"),
]


def _rename(table: str, old: str, new: str) -> None:
    with op.batch_alter_table(table) as batch:
        batch.alter_column(old, new_column_name=new)


def upgrade() -> None:
    op.drop_index("ix_ledger_holder_day", "ledger")
    for table, old, new in RENAMES:
        _rename(table, old, new)
    op.create_index("ix_ledger_caller_day", "ledger", ["caller", "day"])


def downgrade() -> None:
    op.drop_index("ix_ledger_caller_day", "ledger")
    for table, old, new in reversed(RENAMES):
        _rename(table, new, old)
    op.create_index("ix_ledger_holder_day", "ledger", ["holder", "day"])
