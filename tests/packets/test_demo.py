"""The embedded default's first minute: demo data, a run and packets, built once."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.cli import prepare
from service.config import Settings
from service.db import Database
from service.packets.demo import DEMO_TEAM, first_packet_of
from service.packets.models import Packet
from tests.conftest import TokenFactory, bearer


def packet_count(database: Database) -> int:
    with database.session() as session:
        return session.connection().execute(select(func.count()).select_from(Packet)).scalar_one()


def test_prepare_builds_demo_packets_once_and_the_owner_can_open_one(
    settings: Settings, database: Database, client: TestClient, token: TokenFactory
) -> None:
    prepare(settings)
    built = packet_count(database)
    assert built > 0
    prepare(settings)
    assert packet_count(database) == built, "a second serve must not build packets again"

    professional = DEMO_TEAM[0].id
    with database.session() as session:
        packet_id = first_packet_of(session=session, professional_id=professional)
    assert packet_id is not None
    response = client.get(
        f"/v1/packets/{packet_id}/clients", headers=bearer(token(professional, "professional"))
    )
    assert response.status_code == 200, response.text
    clients = response.json()["clients"]
    assert 0 < len(clients) <= 20
    assert all(c["identity"]["bsn"] for c in clients)
    assert all(c["flag"]["explanation"] for c in clients)
