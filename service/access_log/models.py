"""Access-log tables (append-only: migration 0002 adds triggers rejecting UPDATE and DELETE)
and the auditor API's response schemas."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from sqlalchemy import BigInteger, Column, DateTime, Integer, LargeBinary, Text
from sqlmodel import Field, SQLModel


class AccessLogEntry(SQLModel, table=True):
    """One leaf: its canonical JSON bytes and their RFC 6962 leaf hash."""

    __tablename__ = "access_log_entries"

    leaf_index: int = Field(
        sa_column=Column(BigInteger, primary_key=True, autoincrement=False, nullable=False)
    )
    leaf_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    entry: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class AccessLogSubtree(SQLModel, table=True):
    """The hash of a complete subtree over leaves [position·2^level, (position+1)·2^level)."""

    __tablename__ = "access_log_subtrees"

    level: int = Field(
        sa_column=Column(Integer, primary_key=True, autoincrement=False, nullable=False)
    )
    position: int = Field(
        sa_column=Column(BigInteger, primary_key=True, autoincrement=False, nullable=False)
    )
    hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))


class AccessLogCheckpoint(SQLModel, table=True):
    """A signed checkpoint the service issued; at most one per tree size."""

    __tablename__ = "access_log_checkpoints"

    tree_size: int = Field(
        sa_column=Column(BigInteger, primary_key=True, autoincrement=False, nullable=False)
    )
    root_hash: bytes = Field(sa_column=Column(LargeBinary(32), nullable=False))
    note: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class InclusionProofPublic(BaseModel):
    leaf_index: int
    tree_size: int
    hashes: list[str]


class ConsistencyProofPublic(BaseModel):
    first: int
    second: int
    hashes: list[str]
