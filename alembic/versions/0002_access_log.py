"""Access log: entries, subtree hashes, checkpoints, append-only triggers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

APPEND_ONLY_TABLES = ("access_log_entries", "access_log_subtrees", "access_log_checkpoints")


def upgrade() -> None:
    op.create_table(
        "access_log_entries",
        sa.Column("leaf_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("entry", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("leaf_index"),
    )
    op.create_table(
        "access_log_subtrees",
        sa.Column("level", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(length=32), nullable=False),
        sa.PrimaryKeyConstraint("level", "position"),
    )
    op.create_table(
        "access_log_checkpoints",
        sa.Column("tree_size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tree_size"),
    )
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION access_log_append_only() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'the access log is append-only: % on % is not allowed',
                    TG_OP, TG_TABLE_NAME
                    USING ERRCODE = 'insufficient_privilege';
            END;
            $$
            """
        )
        # The append path's first round trip: take the log's advisory lock under a bounded
        # lock_timeout, then read the tree size and its peaks. VOLATILE, so the read takes a
        # fresh snapshot after the lock is held (READ COMMITTED) and sees every earlier append.
        op.execute(
            """
            CREATE FUNCTION access_log_lock_frontier(lock_key bigint, wait text)
            RETURNS TABLE (peak_level integer, peak_position bigint, peak_hash bytea)
            LANGUAGE plpgsql VOLATILE AS $$
            DECLARE
                previous text := current_setting('lock_timeout');
            BEGIN
                PERFORM set_config('lock_timeout', wait, true);
                PERFORM pg_advisory_xact_lock(lock_key);
                PERFORM set_config('lock_timeout', previous, true);
                RETURN QUERY
                WITH RECURSIVE
                tree(size) AS (
                    SELECT coalesce(max(s.position) + 1, 0) FROM access_log_subtrees s
                    WHERE s.level = 0
                ),
                levels(l) AS (SELECT 0 UNION ALL SELECT l + 1 FROM levels WHERE l < 62)
                SELECT -1, tree.size, NULL::bytea FROM tree
                UNION ALL
                SELECT s.level, s.position, s.hash FROM tree, levels, access_log_subtrees s
                WHERE (tree.size >> levels.l) & 1 = 1
                    AND s.level = levels.l AND s.position = (tree.size >> levels.l) - 1;
            END;
            $$
            """
        )
        for table in APPEND_ONLY_TABLES:
            op.execute(
                f"CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION access_log_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION access_log_append_only()"
            )
    else:
        for table in APPEND_ONLY_TABLES:
            for operation in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, 'the access log is append-only: {operation} on "
                    f"{table} is not allowed'); END"
                )


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_change ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS access_log_append_only()")
        op.execute("DROP FUNCTION IF EXISTS access_log_lock_frontier(bigint, text)")
    else:
        for table in APPEND_ONLY_TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    for table in reversed(APPEND_ONLY_TABLES):
        op.drop_table(table)
