"""Inputs that once reached the database and came back as 500s are now clean 422s."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.errors import served_routes
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


# Every integer query parameter, with the role that may ask and what else its route needs.
RUN = "0" * 32
INTEGER_QUERIES: dict[tuple[str, str], tuple[str, dict[str, str]]] = {
    ("/v1/professionals", "limit"): ("coordinator", {}),
    ("/v1/packets", "limit"): ("coordinator", {}),
    ("/v1/flagging/runs", "limit"): ("coordinator", {}),
    (f"/v1/flagging/runs/{RUN}/flags", "after"): ("coordinator", {}),
    (f"/v1/flagging/runs/{RUN}/flags", "limit"): ("coordinator", {}),
    ("/v1/audit/entries", "start"): ("auditor", {"end": "1"}),
    ("/v1/audit/entries", "end"): ("auditor", {"start": "0"}),
    ("/v1/audit/proofs/inclusion", "index"): ("auditor", {"tree_size": "1"}),
    ("/v1/audit/proofs/inclusion", "tree_size"): ("auditor", {"index": "0"}),
    ("/v1/audit/proofs/consistency", "first"): ("auditor", {"second": "1"}),
    ("/v1/audit/proofs/consistency", "second"): ("auditor", {"first": "0"}),
}


def test_every_integer_query_parameter_is_checked_below(app: FastAPI) -> None:
    served = {
        (route.path.replace("{run_id}", RUN), field.alias)
        for route in served_routes(app.routes)
        if isinstance(route, APIRoute)
        for field in route.dependant.query_params
        if field.field_info.annotation in (int, int | None)
    }
    assert served == set(INTEGER_QUERIES)


@pytest.mark.parametrize(
    "spelled",
    ["+1", " 1", "1 ", "1.0", "1_0", "\u0661", "\uff11", "0x1", "1e0", "-0", ""],
)
def test_an_integer_in_a_query_is_written_in_the_digits_0_to_9_alone(
    client: TestClient, token: TokenFactory, spelled: str
) -> None:
    """``?limit=1_0`` was read as 10 and ``?index=+1`` or ``?tree_size=1.0`` as 1: a proxy, a
    log or a person reading the URL sees another number, or none, than the one answered (and
    logged, for an audit read). Any spelling but plain digits is a 422 naming the parameter."""
    for (path, name), (role, others) in INTEGER_QUERIES.items():
        headers = bearer(token("caller-1", role))
        refused = client.get(path, params={**others, name: spelled}, headers=headers)
        assert refused.status_code == 422, (path, name, refused.text)
        assert refused.json()["errors"][0]["loc"] == ["query", name], (path, name)
        assert "digits 0-9" in refused.json()["errors"][0]["msg"], (path, name)
        taken = client.get(path, params={**others, name: "01"}, headers=headers)
        assert taken.status_code != 422, (path, name, taken.text)
