"""Schemas and grammars llama-server never returns from (its memory grew by ~270 MB/s) are 400s before it."""

from __future__ import annotations

import pytest

from gateway.errors import ApiError
from gateway.grammar_check import check_constraints


@pytest.mark.parametrize("body", [
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "minItems": 5,
                                                                           "maxItems": 2}}}},
    {"response_format": {"type": "json_object", "schema": {"type": "string", "minLength": 3, "maxLength": 1}}},
    {"json_schema": {"type": "object", "properties": {"a": {"type": "array", "items": [
        {"type": "object", "minProperties": 4, "maxProperties": 1}]}}}},
    {"text": {"format": {"type": "json_schema", "schema": {"anyOf": [{"minContains": 2, "maxContains": 1}]}}}},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "array", "minItems": 9, "maxItems": 0}}}}}]},
    {"tools": [{"type": "function", "name": "f", "parameters": {"type": "string", "minLength": 2, "maxLength": 1}}]},
    {"grammar": 'root ::= "a"{5,2}'},
    {"grammar": 'root ::= item{ 3 , 1 }\nitem ::= [a-z]'},
])
def test_more_at_least_than_at_most_is_a_400(body: dict) -> None:
    with pytest.raises(ApiError) as err:
        check_constraints(body)
    assert err.value.status == 400 and ("more" in err.value.message)


@pytest.mark.parametrize("body", [
    {},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "minItems": 2,
                                                                           "maxItems": 2}}}},
    {"json_schema": {"type": "string", "minLength": 1}},
    {"grammar": 'root ::= "{5,2}" [{5,2}] "a"{2,5} # {9,1} in a comment\n'},
    {"grammar": "root ::= x{3}"},
    {"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": "text"},
])
def test_anything_else_goes_on_to_llama_server(body: dict) -> None:
    check_constraints(body)
