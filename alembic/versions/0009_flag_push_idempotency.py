"""A push of flags sent with an Idempotency-Key (per source), and the push each flag came in.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "flag_pushes",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("pushed_by", sa.String(length=128), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=False),
        sa.Column("request_digest", sa.String(length=96), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("pushed_by", "idempotency_key", name="uq_flag_pushes_source_key"),
    )
    with op.batch_alter_table("flags") as batch:
        batch.add_column(sa.Column("push_id", sa.String(length=32), nullable=True))
        batch.create_index("ix_flags_push_id", ["push_id"])


def downgrade() -> None:
    with op.batch_alter_table("flags") as batch:
        batch.drop_index("ix_flags_push_id")
        batch.drop_column("push_id")
    op.drop_table("flag_pushes")
