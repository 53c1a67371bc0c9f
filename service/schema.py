"""Every table of the service, gathered in one ``MetaData`` for Alembic and the drift test.

Each domain's ``models`` module is imported here so that its tables register themselves.
"""

from __future__ import annotations

from sqlmodel import SQLModel

import service.access_log.models
import service.db
import service.flagging.models
import service.packets.models
import service.records.models  # noqa: F401

metadata = SQLModel.metadata
