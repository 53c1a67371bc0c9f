"""How a follow-up's note is bound: NULL for notes written before they were bound to their client
(follow-up and packet only), 2 for notes bound to their client as well.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("packet_followups") as batch:
        batch.add_column(sa.Column("note_binding", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("packet_followups") as batch:
        batch.drop_column("note_binding")
