"""Error shapes per path (Ollama's port serves OpenAI's /v1 with OpenAI errors), Retry-After on overload,
and LM Studio's v0 extras (gateway/lmstudio.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from config.schema import ModelConfig
from gateway import lmstudio
from gateway.catalog import ModelEntry
from gateway.errors import ApiError, ollama_error_body, openai_error_body
from gateway.gguf_info import ModelFacts
from gateway.server import error_middleware


async def _client(status: int) -> TestClient:
    async def fail(_: web.Request) -> web.Response:
        raise ApiError(status, "nope")

    app = web.Application(middlewares=[error_middleware(ollama_error_body, {"/v1/": openai_error_body})])
    app.router.add_get("/api/x", fail)
    app.router.add_get("/v1/x", fail)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_error_shape_follows_the_path_prefix() -> None:
    client = await _client(400)
    try:
        r = await client.get("/api/x")
        assert r.status == 400 and await r.json() == {"error": "nope (llama-runner)"}
        r = await client.get("/v1/x")
        doc = await r.json()
        assert r.status == 400 and doc["error"]["type"] == "invalid_request_error"
        r = await client.get("/v1/unknown")  # aiohttp's own 404, in OpenAI's shape under /v1
        assert r.status == 404 and (await r.json())["error"]["code"] is None  # (not an unknown model)
        r = await client.post("/v1/x")  # aiohttp's 405, with the methods the path takes
        assert r.status == 405 and "GET" in r.headers["Allow"] and isinstance((await r.json())["error"], dict)
        r = await client.get("/v1")  # the prefix itself, as clients normalise "/v1/x/.." to it
        assert r.status == 404 and isinstance((await r.json())["error"], dict)
        r = await client.get("/api/unknown")
        assert r.status == 404 and isinstance((await r.json())["error"], str)
        assert "Retry-After" not in r.headers
    finally:
        await client.close()


@pytest.mark.parametrize("status", [429, 503])
async def test_overload_answers_carry_retry_after(status: int) -> None:
    client = await _client(status)
    try:
        for path in ("/api/x", "/v1/x"):
            r = await client.get(path)
            # a full queue: OpenAI's 429, Ollama's 503 ("server busy")
            assert r.status == (503 if path == "/api/x" else status) and r.headers["Retry-After"] == "1"
    finally:
        await client.close()


def test_openai_error_names_an_unknown_model_model_not_found() -> None:
    body = openai_error_body(ApiError(404, "model 'x' not found", code="unknown_model"))
    assert body["error"]["code"] == "model_not_found" and body["error"]["type"] == "invalid_request_error"


def _entry(mode: str = "chat") -> ModelEntry:
    facts = ModelFacts(architecture="llama", organization="HuggingFaceTB", quantization="Q4_1", context_length=8192)
    return ModelEntry("m", ModelConfig(model_path="x", mode=mode), Path("x"), 0.0, 1, facts)  # type: ignore[arg-type]


def test_v0_model_object() -> None:
    assert lmstudio.model_object(_entry(), loaded=True) == {
        "id": "m", "object": "model", "type": "llm", "publisher": "HuggingFaceTB", "arch": "llama",
        "compatibility_type": "gguf", "quantization": "Q4_1", "state": "loaded", "max_context_length": 8192,
        "loaded_context_length": 2048, "capabilities": []}  # (the context it runs with, as LM Studio says)
    emb = lmstudio.model_object(_entry("embedding"), loaded=False)
    assert emb["type"] == "embeddings" and emb["state"] == "not-loaded" and "loaded_context_length" not in emb


@pytest.mark.parametrize(("finish", "reason"), [
    ("stop", "eosFound"), ("length", "maxPredictedTokensReached"), ("tool_calls", "toolCalls"), (None, "eosFound"),
])
def test_v0_stop_reason(finish: Any, reason: str) -> None:
    assert lmstudio.stop_reason(finish) == reason


def test_v0_extras_on_the_chunk_with_timings() -> None:
    extras = lmstudio.V0Extras(_entry())
    first = extras({"choices": [{"index": 0, "finish_reason": "length", "delta": {}}]})
    assert "stats" not in first
    last = extras({"choices": [], "usage": {}, "timings": {"prompt_ms": 120.0, "predicted_ms": 500.0,
                                                            "predicted_per_second": 40.0}})
    assert last["stats"] == {"tokens_per_second": 40.0, "time_to_first_token": 0.12, "generation_time": 0.5,
                             "stop_reason": "maxPredictedTokensReached"}
    assert last["model_info"] == {"arch": "llama", "quant": "Q4_1", "format": "gguf", "context_length": 2048}
    assert last["runtime"]["supported_formats"] == ["gguf"]


async def test_a_server_side_failure_is_logged_with_its_request() -> None:
    """(A 502 among thousands of requests could not be traced: the gateways logged no request.)"""
    import structlog

    for status, logged in ((502, True), (400, False)):
        client = await _client(status)
        try:
            with structlog.testing.capture_logs() as events:
                r = await client.get("/v1/x")
            assert r.status == status
            failed = [e for e in events if e["event"] == "request_failed"]
            assert bool(failed) == logged
            if logged:
                assert failed[0]["path"] == "/v1/x" and failed[0]["status"] == 502 and failed[0]["message"] == "nope"
        finally:
            await client.close()
