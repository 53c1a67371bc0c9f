"""Flagging runs and flags, professionals, packets and members.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "flagging_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("policy_name", sa.String(length=128), nullable=False),
        sa.Column("policy_version", sa.String(length=64), nullable=False),
        sa.Column("as_of", sa.Date(), nullable=False),
        sa.Column("started_by", sa.String(length=128), nullable=False),
        sa.Column("evaluated", sa.Integer(), nullable=False),
        sa.Column("flagged", sa.Integer(), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("finished_at", _tz(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "flags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("policy_version", sa.String(length=64), nullable=True),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("pushed_by", sa.String(length=128), nullable=True),
        sa.Column("hits", sa.JSON(), nullable=False),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["flagging_runs.id"]),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_flags_run_id_id", "flags", ["run_id", "id"])
    op.create_index("ix_flags_subject_id", "flags", ["subject_id"])
    op.create_index("ix_flags_kind", "flags", ["kind"])
    op.create_table(
        "professionals",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("team", sa.String(length=64), nullable=False),
        sa.Column("capacity", sa.Integer(), nullable=False),
        sa.Column("districts", sa.JSON(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("updated_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "packets",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("professional_id", sa.String(length=128), nullable=False),
        sa.Column("district", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", _tz(), nullable=False),
        sa.Column("expires_at", _tz(), nullable=False),
        sa.Column("closed_at", _tz(), nullable=True),
        sa.Column("shredded_at", _tz(), nullable=True),
        sa.Column("wrapped_key", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["flagging_runs.id"]),
        sa.ForeignKeyConstraint(["professional_id"], ["professionals.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_packets_professional_status", "packets", ["professional_id", "status"])
    op.create_index("ix_packets_run_id", "packets", ["run_id"])
    op.create_table(
        "packet_members",
        sa.Column("packet_id", sa.String(length=36), nullable=False),
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("flag_id", sa.Integer(), nullable=False),
        sa.Column("wrapped_dek", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["packet_id"], ["packets.id"]),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"]),
        sa.ForeignKeyConstraint(["flag_id"], ["flags.id"]),
        sa.PrimaryKeyConstraint("packet_id", "subject_id"),
    )
    op.create_index("ix_packet_members_subject_id", "packet_members", ["subject_id"])


def downgrade() -> None:
    op.drop_index("ix_packet_members_subject_id", table_name="packet_members")
    op.drop_table("packet_members")
    op.drop_index("ix_packets_run_id", table_name="packets")
    op.drop_index("ix_packets_professional_status", table_name="packets")
    op.drop_table("packets")
    op.drop_table("professionals")
    op.drop_index("ix_flags_kind", table_name="flags")
    op.drop_index("ix_flags_subject_id", table_name="flags")
    op.drop_index("ix_flags_run_id_id", table_name="flags")
    op.drop_table("flags")
    op.drop_table("flagging_runs")
