"""Access log (SQLite): refuse an INSERT that would replace a row (INSERT OR REPLACE).

SQLite carries out a REPLACE by deleting the row in the way without firing its DELETE triggers
(unless recursive_triggers is on), so the append-only triggers of 0002 let a stored entry, subtree
hash or checkpoint be overwritten in place. A BEFORE INSERT trigger refuses any insert whose key
is taken; a new row (the only kind the service writes) passes. PostgreSQL has no REPLACE: its
upsert is an UPDATE, which 0002's trigger refuses.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEYS = {
    "access_log_entries": ("leaf_index",),
    "access_log_subtrees": ("level", "position"),
    "access_log_checkpoints": ("tree_size",),
}


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        return
    for table, key in KEYS.items():
        taken = " AND ".join(f"{column} = NEW.{column}" for column in key)
        # Table and column names are this file's constants.
        trigger = (
            f"CREATE TRIGGER {table}_no_replace BEFORE INSERT ON {table} "  # noqa: S608
            f"WHEN EXISTS (SELECT 1 FROM {table} WHERE {taken}) "
            f"BEGIN SELECT RAISE(ABORT, 'the access log is append-only: REPLACE on {table} is "
            "not allowed'); END"
        )
        op.execute(trigger)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        return
    for table in KEYS:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_replace")
