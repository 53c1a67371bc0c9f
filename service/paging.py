"""Cursors of the lists shown newest first (packets, flagging runs).

A page ends at its last item's place in the order, ``(created_at, id)``, and the next page
starts after that place: items made or changed while a caller pages never shift what the next
page holds. A cursor is that place, base64url-encoded; a cursor this service did not hand out is
a 422 that does not echo it (it is the caller's text).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.sql.elements import ColumnElement

from service.errors import Unprocessable


class BadCursor(Unprocessable):
    pass


def cursor(created_at: datetime, item_id: str) -> str:
    """Where a page ended: its last item's place in the order."""
    place = f"{created_at.astimezone(UTC).isoformat()}|{item_id}"
    return base64.urlsafe_b64encode(place.encode()).decode().rstrip("=")


def place_of(cursor: str, read_id: Callable[[str], str]) -> tuple[datetime, str]:
    """The ``(created_at, id)`` a cursor names; ``read_id`` returns the id in its one spelling
    or raises ``ValueError``. ``BadCursor`` for anything else."""
    try:
        made, item_id = (
            base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("|")
        )
        return datetime.fromisoformat(made).astimezone(UTC), read_id(item_id)
    except (ValueError, OverflowError):
        raise BadCursor(
            "after is not a cursor this service handed out; use a page's next_after",
            errors=[{"loc": ["query", "after"], "msg": "not a cursor from a previous page"}],
        ) from None


def after_place(
    given: str, read_id: Callable[[str], str], *, created_at: Any, item_id: Any
) -> ColumnElement[bool]:
    """The rows that come after the cursor ``given`` in the order newest first, then by id."""
    made, last_id = place_of(given, read_id)
    return or_(created_at < made, and_(created_at == made, item_id > last_id))
