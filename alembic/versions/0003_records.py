"""Record store: subjects (identity vault), events, ingest batches (idempotency).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subjects",
        sa.Column("district", sa.String(length=64), nullable=False),
        sa.Column("neighbourhood", sa.String(length=64), nullable=False),
        sa.Column("birth_year", sa.Integer(), nullable=True),
        sa.Column("household_type", sa.String(length=32), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("pseudonym_key_version", sa.Integer(), nullable=False),
        sa.Column("identity_ciphertext", sa.Text(), nullable=True),
        sa.Column("wrapped_dek", sa.String(length=255), nullable=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_subjects_pseudonym", "subjects", ["pseudonym"], unique=True)
    op.create_table(
        "events",
        sa.Column("subject_id", sa.Integer(), nullable=False),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("source_event_id", sa.String(length=128), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("date", sa.Date(), nullable=False),
        sa.Column("office", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["subject_id"], ["subjects.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "source_event_id", name="uq_events_source_event"),
    )
    op.create_index("ix_events_subject_date", "events", ["subject_id", "date"], unique=False)
    op.create_table(
        "ingest_batches",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=128), nullable=True),
        sa.Column("request_digest", sa.String(length=96), nullable=False),
        sa.Column("subject_count", sa.Integer(), nullable=False),
        sa.Column("response", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "idempotency_key", name="uq_ingest_batches_source_key"),
    )


def downgrade() -> None:
    op.drop_table("ingest_batches")
    op.drop_index("ix_events_subject_date", table_name="events")
    op.drop_table("events")
    op.drop_index("ix_subjects_pseudonym", table_name="subjects")
    op.drop_table("subjects")
