"""The municipality's calendar day.

Dates in the records (events, birth dates) and a flagging run's ``as_of`` are local dates, so
"today" is the date in ``CASEPACKETS_TIMEZONE`` (default Europe/Amsterdam), not the host's: a
container's clock usually runs in UTC, which is yesterday in Amsterdam for the first hour or two
of each day. The zone is read from the environment once, on first use.
"""

from __future__ import annotations

import os
from datetime import date, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TIMEZONE = "Europe/Amsterdam"
TIMEZONE_VARIABLE = "CASEPACKETS_TIMEZONE"


def zone_named(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ``ValueError`` naming the setting when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{TIMEZONE_VARIABLE}: {name!r} is not an IANA time zone") from None


@lru_cache(maxsize=1)
def zone() -> ZoneInfo:
    """The municipality's time zone (``Settings`` refuses an unknown one at start-up)."""
    return zone_named(os.environ.get(TIMEZONE_VARIABLE, DEFAULT_TIMEZONE))


def today() -> date:
    """Today's date where the municipality is."""
    return datetime.now(zone()).date()
