"""Every table of the service, gathered in one ``MetaData`` for Alembic and the drift test.

Each domain's ``models`` module is imported here so that its tables register themselves.
"""

from __future__ import annotations

from sqlmodel import SQLModel

metadata = SQLModel.metadata
