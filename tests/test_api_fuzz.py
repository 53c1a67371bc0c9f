"""Property-based API fuzzing against the committed contract (schemathesis), on both databases.

A caller holding every role sends generated requests to every operation. Whatever the input, the
service must never answer 5xx, and every answer must conform to the OpenAPI document (declared
status codes, content types and response schemas).

The operations are driven one by one with their Hypothesis strategies rather than through
schemathesis' pytest plugin, whose parametrization does not work under pytest 9.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err

from service.auth.permissions import Role
from tests.conftest import TokenFactory, bearer

ALL_ROLES = tuple(role.value for role in Role)
# CASEPACKETS_FUZZ_EXAMPLES=500 scripts/test -k fuzz digs deeper than the default run.
EXAMPLES_PER_OPERATION = int(os.environ.get("CASEPACKETS_FUZZ_EXAMPLES", "15"))
# Semantic rules the schema cannot express (the BSN 11-check, the event vocabulary, dates in the
# past) rightly reject some schema-valid bodies, so "positive data acceptance" is not checked.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_operation_survives_generated_input(app: FastAPI, token: TokenFactory) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    headers = bearer(token("fuzzer", *ALL_ROLES, ttl=3600))
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise AssertionError(f"the contract has an invalid operation: {result.err()}")
        operations.append(result.ok())
    assert len(operations) >= 25, "the contract lost operations"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def exercise(case: Any) -> None:
            response = case.call(headers=headers)
            case.validate_response(response, checks=CHECKS)

        exercise()
