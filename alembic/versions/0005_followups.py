"""Follow-ups and packet lifecycle.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("packets") as batch:
        batch.add_column(sa.Column("opened_at", _tz(), nullable=True))
    # The shredder looks for open packets past expiry and closed packets past their grace.
    op.create_index("ix_packets_status_expires_at", "packets", ["status", "expires_at"])
    op.create_table(
        "packet_followups",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("packet_id", sa.String(length=36), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("outcome_code", sa.String(length=64), nullable=True),
        sa.Column("note_ciphertext", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.ForeignKeyConstraint(["packet_id"], ["packets.id"]),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_packet_followups_packet_subject", "packet_followups", ["packet_id", "subject_id"]
    )


def downgrade() -> None:
    op.drop_index("ix_packet_followups_packet_subject", table_name="packet_followups")
    op.drop_table("packet_followups")
    op.drop_index("ix_packets_status_expires_at", table_name="packets")
    with op.batch_alter_table("packets") as batch:
        batch.drop_column("opened_at")
