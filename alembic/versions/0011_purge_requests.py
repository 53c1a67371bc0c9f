"""Purges asked for by the transactions that overwrote wraps, kept until one is done.

Before this, a purge a reader held up stayed pending only in the memory of the worker that
overwrote (and in a file of `casepackets expire`'s home): a restart forgot it. A database that
holds subjects gets one request at once, for whatever a purge left pending before the upgrade.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    requests = op.create_table(
        "purge_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("horizon", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sqlite_autoincrement=True,
    )
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT 1 FROM subjects LIMIT 1")).first() is None:
        return  # a new database: nothing was ever overwritten
    horizon = None
    if bind.dialect.name == "postgresql":
        horizon = int(bind.exec_driver_sql("SELECT pg_current_xact_id()::text").scalar_one())
    bind.execute(sa.insert(requests).values(horizon=horizon))


def downgrade() -> None:
    op.drop_table("purge_requests")
