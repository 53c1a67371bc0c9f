"""Further flags placed with a packet member (a source's pushed flag beside the run's flag).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "packet_member_flags",
        sa.Column("packet_id", sa.String(length=36), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("flag_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["packet_id"], ["packets.id"]),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"]),
        sa.ForeignKeyConstraint(["flag_id"], ["flags.id"]),
        sa.PrimaryKeyConstraint("packet_id", "subject_id", "flag_id"),
    )
    op.create_index(
        "ix_packet_member_flags_flag_id", "packet_member_flags", ["flag_id"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_packet_member_flags_flag_id", table_name="packet_member_flags")
    op.drop_table("packet_member_flags")
