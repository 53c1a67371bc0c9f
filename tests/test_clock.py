"""'Today' is the municipality's date (CASEPACKETS_TIMEZONE), not the host's."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from service import clock
from service.config import Settings
from service.records.models import not_after_today

AHEAD = "Pacific/Kiritimati"  # UTC+14
BEHIND = "Pacific/Pago_Pago"  # UTC-11: always at least a day behind AHEAD


@pytest.fixture
def zone_set(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    clock.zone.cache_clear()
    yield monkeypatch
    clock.zone.cache_clear()


def test_today_is_the_date_in_the_configured_zone(zone_set: pytest.MonkeyPatch) -> None:
    ahead_today = datetime.now(ZoneInfo(AHEAD)).date()
    zone_set.setenv(clock.TIMEZONE_VARIABLE, AHEAD)
    assert clock.today() == ahead_today
    assert not_after_today(ahead_today)
    clock.zone.cache_clear()
    zone_set.setenv(clock.TIMEZONE_VARIABLE, BEHIND)
    assert clock.today() < ahead_today
    assert not not_after_today(ahead_today), "a date still to come where the office is"


def test_the_default_zone_is_amsterdam(zone_set: pytest.MonkeyPatch) -> None:
    zone_set.delenv(clock.TIMEZONE_VARIABLE, raising=False)
    assert clock.zone() == ZoneInfo("Europe/Amsterdam")


def test_an_unknown_zone_is_refused_by_the_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'Mars/Olympus' is not an IANA time zone"):
        Settings(home=tmp_path, timezone="Mars/Olympus")
