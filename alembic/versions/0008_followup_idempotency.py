"""A follow-up's Idempotency-Key (per caller) and the digest of what was asked with it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("packet_followups") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("request_digest", sa.String(length=64), nullable=True))
        batch.create_index(
            "ux_packet_followups_idempotency", ["created_by", "idempotency_key"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("packet_followups") as batch:
        batch.drop_index("ux_packet_followups_idempotency")
        batch.drop_column("request_digest")
        batch.drop_column("idempotency_key")
