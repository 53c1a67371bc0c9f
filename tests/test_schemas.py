"""Inputs that once reached the database and came back as 500s are now clean 422s."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.schemas import refuse_nul
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
    # a district is checked for control characters on its own, so the refusal names which one
    assert {tuple(e["loc"]) for e in response.json()["errors"]} == {("id",), ("districts", 0)}
    assert "\u0000" not in response.text


@pytest.mark.parametrize(
    "value",
    [
        "a\u0000b",
        ["ok", "a\u0000"],
        ("ok", ("deeper\u0000",)),
        {"a\u0000": "key"},
        {"key": ["a\u0000"]},
        {"a\u0000"},
        frozenset({"a\u0000"}),
    ],
    ids=["text", "list", "nested-tuple", "dict-key", "dict-value", "set", "frozenset"],
)
def test_refuse_nul_finds_a_nul_in_any_text_inside_a_value(value: Any) -> None:
    with pytest.raises(ValueError, match="must not contain NUL characters") as refused:
        refuse_nul(value)
    assert "\u0000" not in str(refused.value)


def test_refuse_nul_hands_back_a_value_without_one() -> None:
    value = {"districts": ["Charlois", "Feijenoord"], "capacity": 3}
    assert refuse_nul(value) is value
