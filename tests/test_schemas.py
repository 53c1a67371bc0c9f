"""Inputs that once reached the database and came back as 500s are now clean 422s."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import TokenFactory, bearer


def test_a_cursor_beyond_64_bits_is_422_not_a_driver_error(
    client: TestClient, token: TokenFactory
) -> None:
    response = client.get(
        f"/v1/flagging/runs/{'0' * 32}/flags",
        params={"after": 2**70},
        headers=bearer(token("c-1", "coordinator")),
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["loc"] == ["query", "after"]


def test_an_audit_index_beyond_64_bits_is_422(client: TestClient, token: TokenFactory) -> None:
    response = client.get(
        "/v1/audit/proofs/inclusion",
        params={"index": 0, "tree_size": 2**64},
        headers=bearer(token("a-1", "auditor")),
    )
    assert response.status_code == 422


def test_nul_characters_are_refused_on_both_engines(
    client: TestClient, token: TokenFactory
) -> None:
    professional = {
        "id": "prof-\u0000",
        "display_name": "x",
        "team": "t",
        "districts": ["Charlois\u0000"],
        "capacity": 1,
    }
    response = client.post(
        "/v1/professionals", json=professional, headers=bearer(token("c-1", "coordinator"))
    )
    assert response.status_code == 422
    assert {tuple(e["loc"]) for e in response.json()["errors"]} == {("id",), ("districts",)}
    assert "\u0000" not in response.text
