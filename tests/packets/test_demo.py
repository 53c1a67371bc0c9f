"""The embedded default's first minute: demo data, a run and packets, built once (by `serve` on
the embedded database only; here on both engines)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.cli import demo_first_packet, prepare_demo
from service.config import PROJECT_ROOT, Settings
from service.db import Database
from service.flagging.policy import load_flagging_policy
from service.packets.demo import DEMO_TEAM, first_packet_of
from service.packets.models import Packet
from service.records.demo import REFERENCE_DATE
from tests.conftest import TokenFactory, bearer
from tests.packets.scenario import record


def packet_count(database: Database) -> int:
    with database.session() as session:
        return session.connection().execute(select(func.count()).select_from(Packet)).scalar_one()


def test_the_demo_builds_packets_once_and_the_owner_can_open_one(
    settings: Settings, database: Database, client: TestClient, token: TokenFactory
) -> None:
    prepare_demo(settings)
    built = packet_count(database)
    assert built > 0
    prepare_demo(settings)
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
    for flag in (c["flag"] for c in clients):
        assert flag["hits"], "every client in the printed packet says which rule surfaced them"
        assert flag["explanation"] == " ".join(hit["explanation"] for hit in flag["hits"])


def test_no_demo_packets_are_built_over_records_someone_imported(
    settings: Settings, database: Database, client: TestClient, token: TokenFactory
) -> None:
    """A demo team given packets of real people, and a printed curl that re-identifies them,
    would be a breach in development as anywhere."""
    imported = client.post(
        "/v1/records/batch",
        json={"subjects": [record(0, "Charlois"), record(1, "Charlois")]},
        headers=bearer(token("gemeente", "source")),
    )
    assert imported.status_code == 200, imported.text
    prepare_demo(settings)
    assert packet_count(database) == 0
    assert demo_first_packet(settings, DEMO_TEAM[0].id) is None


def test_the_demo_run_flags_every_rule_of_the_shipped_policy_as_of_the_demo_date(
    settings: Settings, database: Database, client: TestClient, token: TokenFactory
) -> None:
    prepare_demo(settings)
    with database.session() as session:
        packet_id = first_packet_of(session=session, professional_id=DEMO_TEAM[0].id)
    assert packet_id is not None
    coordinator = bearer(token("coord-001", "coordinator"))
    packet = client.get(f"/v1/packets/{packet_id}", headers=coordinator).json()
    run = client.get(f"/v1/flagging/runs/{packet['run_id']}", headers=coordinator).json()
    assert run["as_of"] == REFERENCE_DATE.isoformat()

    page = client.get(f"/v1/flagging/runs/{run['id']}/flags?limit=1000", headers=coordinator)
    assert page.status_code == 200, page.text
    flags = page.json()["items"]
    assert len(flags) == run["flagged"]
    shipped = load_flagging_policy(settings.policies_dir / "flagging.yaml")
    flagged_by = {hit["rule_id"] for flag in flags for hit in flag["hits"]}
    assert flagged_by == {rule.id for rule in shipped.rules}
    for rule in shipped.rules:
        matching = sum(any(h["rule_id"] == rule.id for h in f["hits"]) for f in flags)
        assert matching < run["evaluated"] / 2, f"{rule.id} should flag a minority, not most"


def test_the_readme_names_the_day_the_demo_is_flagged_as_of() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(REFERENCE_DATE.isoformat()) >= 3  # quick start, first minute, demo row
