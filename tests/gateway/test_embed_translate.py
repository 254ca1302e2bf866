"""Embeddings translators (gateway/embed_translate.py): requests of both protocols, replies, dimensions."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import embed_translate as tr
from gateway.errors import ApiError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


def test_ollama_embed_string_list_and_empty() -> None:
    assert tr.ollama_embed_request({"model": "m", "input": "a"}).inputs == ["a"]
    r = tr.ollama_embed_request({"model": "m", "input": ["a", "b"], "truncate": False, "dimensions": 8})
    assert (r.inputs, r.truncate, r.dimensions) == (["a", "b"], False, 8)
    assert tr.ollama_embed_request({"model": "m"}).inputs == []  # just loads the model
    assert tr.ollama_embed_request({"model": "m", "input": ""}).inputs == []
    assert tr.ollama_embed_request({"model": "m", "input": "x"}).truncate is True


@pytest.mark.parametrize(("req", "param"), [
    ({"input": "a"}, "model"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": ["a", 1]}, "input"),
    ({"model": "m", "input": "a", "truncate": "yes"}, "truncate"),
    ({"model": "m", "input": "a", "dimensions": -1}, "dimensions"),  # (0: Ollama's "not set")
    ({"model": "m", "input": "a", "dimensions": True}, "dimensions"),
    ({"model": "m", "input": "a", "options": []}, "options"),
])
def test_ollama_embed_invalid_is_400(req: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as err:
        tr.ollama_embed_request(req)
    assert err.value.status == 400 and err.value.param == param


def test_legacy_embeddings_prompt() -> None:
    assert tr.ollama_embeddings_request({"model": "m", "prompt": "p"}).inputs == ["p"]
    assert tr.ollama_embeddings_request({"model": "m"}).inputs == []
    with pytest.raises(ApiError):
        tr.ollama_embeddings_request({"model": "m", "prompt": ["p"]})


def test_openai_inputs() -> None:
    assert tr.openai_embeddings_request({"model": "m", "input": "a"}).inputs == ["a"]
    assert tr.openai_embeddings_request({"model": "m", "input": ["a", "b"]}).inputs == ["a", "b"]
    assert tr.openai_embeddings_request({"model": "m", "input": [1, 2, 3]}).inputs == [[1, 2, 3]]
    assert tr.openai_embeddings_request({"model": "m", "input": [[1, 2], [3]]}).inputs == [[1, 2], [3]]
    assert tr.openai_embeddings_request({"input": "a"}).inputs == ["a"]  # default model (LM Studio)
    r = tr.openai_embeddings_request({"model": "m", "input": "a", "encoding_format": "base64"})
    assert r.encoding_format == "base64" and r.truncate is False


@pytest.mark.parametrize("req", [
    {"model": "m"},
    {"model": "m", "input": []},
    {"model": "m", "input": [True]},
    {"model": "m", "input": "a", "encoding_format": "int8"},
    {"model": 3, "input": "a"},
])
def test_openai_invalid_is_400(req: dict[str, Any]) -> None:
    with pytest.raises(ApiError) as err:
        tr.openai_embeddings_request(req)
    assert err.value.status == 400


@given(json_values)
def test_any_request_is_valid_or_a_400(req: Any) -> None:
    for parse in (tr.ollama_embed_request, tr.ollama_embeddings_request, tr.openai_embeddings_request):
        try:
            r = parse(req)
        except ApiError as err:
            assert err.status == 400
        else:
            assert isinstance(r.inputs, list)
            body = r.backend_body("m")
            assert body["input"] == r.inputs and body["encoding_format"] == "float"


def test_vectors_from_backend_orders_by_index_and_counts_tokens() -> None:
    body = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
            "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    assert tr.vectors_from_backend(body) == ([[1.0, 0.0], [0.0, 1.0]], 7)
    # pooling "none": one vector per token, the first is taken
    assert tr.vectors_from_backend({"data": [{"index": 0, "embedding": [[1.0], [2.0]]}]}) == ([[1.0]], 0)
    with pytest.raises(ApiError) as err:
        tr.vectors_from_backend({"error": "x"})
    assert err.value.source == "backend"


@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=40), st.integers(1, 50))
def test_fit_dimensions_truncates_and_normalizes(vector: list[float], dims: int) -> None:
    out = tr.fit_dimensions(vector, dims)
    if dims >= len(vector):
        assert out == vector
        return
    assert len(out) == dims
    norm = math.sqrt(sum(v * v for v in out))
    assert norm == 0 or abs(norm - 1) < 1e-9


def test_ollama_response_shape() -> None:
    r = tr.ollama_embed_response("m", [[3.0, 4.0, 0.0]], 5, 100, 10, dimensions=2)
    assert r == {"model": "m", "embeddings": [[0.6, 0.8]], "total_duration": 100, "load_duration": 10,
                 "prompt_eval_count": 5}


def test_openai_response_float_and_base64() -> None:
    req = tr.openai_embeddings_request({"model": "m", "input": ["a", "b"]})
    r = tr.openai_embeddings_response("m", [[0.5, 0.25], [1.0, 0.0]], 3, req)
    assert r == {"object": "list", "model": "m", "usage": {"prompt_tokens": 3, "total_tokens": 3},
                 "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]},
                          {"object": "embedding", "index": 1, "embedding": [1.0, 0.0]}]}
    req = tr.openai_embeddings_request({"model": "m", "input": "a", "encoding_format": "base64"})
    r = tr.openai_embeddings_response("m", [[0.5, 0.25]], 1, req)
    raw = base64.b64decode(r["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == [0.5, 0.25]  # what the openai client decodes


def test_is_too_long_matches_llama_server_messages() -> None:
    msg = "input (3001 tokens) is too large to process. increase the physical batch size (current batch size: 512)"
    assert tr.is_too_long(ApiError(500, msg, source="backend"))
    assert not tr.is_too_long(ApiError(500, "Input content cannot be empty", source="backend"))


def test_golden_llama_server_embeddings_reply() -> None:
    """A real reply of llama-server (--embeddings --pooling mean, SmolLM2) to two inputs."""
    import json
    from pathlib import Path

    body = json.loads((Path(__file__).parent / "golden" / "embeddings.json").read_text())
    vectors, tokens = tr.vectors_from_backend(body)
    assert len(vectors) == 2 and all(len(v) == 576 for v in vectors) and tokens == 7
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)  # llama-server normalizes
    ollama = tr.ollama_embed_response("smollm2-embed", vectors, tokens, 5, 1)
    assert ollama["embeddings"] == vectors and ollama["prompt_eval_count"] == 7
    req = tr.openai_embeddings_request({"model": "e", "input": ["Why is the sky blue?", "hello"]})
    oa = tr.openai_embeddings_response("e", vectors, tokens, req)
    assert [d["index"] for d in oa["data"]] == [0, 1] and oa["data"][1]["embedding"] == vectors[1]
    assert oa["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_openai_dimensions_beyond_the_model_are_a_400() -> None:
    req = tr.openai_embeddings_request({"model": "m", "input": "a", "dimensions": 3})
    with pytest.raises(ApiError) as err:
        tr.openai_embeddings_response("m", [[0.5, 0.25]], 1, req)
    assert err.value.status == 400 and err.value.param == "dimensions"


def test_a_context_overflow_of_the_backend_has_openais_code() -> None:
    from gateway.relay import backend_error

    body = (b'{"error": {"code": 400, "message": "request (3031 tokens) exceeds the available context size",'
            b' "type": "exceed_context_size_error", "n_prompt_tokens": 3031, "n_ctx": 2048}}')
    err = backend_error(400, body)
    assert err.code == "context_length_exceeded" and err.source == "backend" and "3031 tokens" in err.message
    assert backend_error(500, b'{"error": {"message": "x", "type": "server_error"}}').code == "backend_error"
