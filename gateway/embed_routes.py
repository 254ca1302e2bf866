"""Embedding routes of both gateways: Ollama ``/api/embed`` + ``/api/embeddings``, OpenAI ``/v1/embeddings``.

An input longer than the model's context fails at llama-server; with ``truncate`` (Ollama's default) the
inputs are then tokenized by llama-server, cut to the context length, and embedded again as token lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from aiohttp import web

from gateway import embed_translate as tr
from gateway.catalog import require_capability
from gateway.errors import ApiError
from gateway.ollama_translate import parse_keep_alive
from gateway.server import BUS, CONFIG, LAUNCH, json_response, open_job, read_json, started_ns


async def _call(request: web.Request, model: str, path: str, body: dict[str, Any],
                keep_alive: float | None) -> tuple[Any, int]:
    relay = await open_job(request, model, path, body, False, keep_alive)
    try:
        raw = await relay.body()
    finally:
        await relay.close()
    try:
        return msgspec.json.decode(raw), relay.load_ns
    except msgspec.DecodeError:
        raise ApiError(502, "llama-server sent an answer that is not JSON", source="backend") from None


async def _truncated(request: web.Request, model: str, inputs: list[Any], keep_alive: float | None
                     ) -> list[Any]:
    config = request.app[CONFIG]
    resolved = config.resolve_model(model) or model
    limit = config.models.models[resolved].parameters.ctx_size if resolved in config.models.models else 512
    out = []
    for item in inputs:
        if isinstance(item, str):
            doc, _ = await _call(request, model, "/tokenize", {"content": item, "add_special": True}, keep_alive)
            tokens = doc.get("tokens") if isinstance(doc, dict) else None
            if not isinstance(tokens, list):
                raise ApiError(502, "llama-server sent no tokens", source="backend")
            item = tokens
        out.append(item[:limit])
    return out


# Inputs per llama-server call. llama-server finishes every input of a call it was given, client gone or not (2,000
# inputs kept it busy for minutes after their client left); in calls of this many, a client that leaves stops its
# batch within one call, at a cost of one bus round trip (~1 ms) per call.
CHUNK = 32


async def embed(request: web.Request, model: str, ereq: tr.EmbedRequest, keep_alive: float | None = None
                ) -> tuple[list[list[float]], int, int]:
    """Embed ``ereq.inputs`` with ``model``: (vectors, prompt tokens, load ns). No inputs: just load."""
    require_capability(request.app[CONFIG], model, "embeddings")
    if not ereq.inputs:
        bus = request.app[BUS]
        t0 = started_ns()
        bus.release((await bus.acquire(model, keep_alive)).request_id)
        return [], 0, started_ns() - t0
    vectors, tokens, load_ns = await _embed_chunk(request, model, ereq, ereq.inputs[:CHUNK], keep_alive)
    for start in range(CHUNK, len(ereq.inputs), CHUNK):
        more, more_tokens, _ = await _embed_chunk(request, model, ereq, ereq.inputs[start:start + CHUNK], keep_alive)
        vectors += more
        tokens += more_tokens
    return vectors, tokens, load_ns


async def _embed_chunk(request: web.Request, model: str, ereq: tr.EmbedRequest, inputs: list[Any],
                       keep_alive: float | None) -> tuple[list[list[float]], int, int]:
    try:
        doc, load_ns = await _call(request, model, tr.EMBEDDINGS_PATH, ereq.backend_body(model, inputs), keep_alive)
    except ApiError as err:
        if err.source != "backend" or not tr.is_too_long(err):
            raise
        if not ereq.truncate:
            raise ApiError(400, f"input length exceeds the context length ({err.message})",
                           code="context_length_exceeded", param="input") from None
        inputs = await _truncated(request, model, inputs, keep_alive)
        doc, load_ns = await _call(request, model, tr.EMBEDDINGS_PATH, ereq.backend_body(model, inputs),
                                   keep_alive)
    vectors, tokens = tr.vectors_from_backend(doc)
    if len(vectors) != len(inputs):
        raise ApiError(502, f"llama-server sent {len(vectors)} embeddings for {len(inputs)} inputs", source="backend")
    return vectors, tokens, load_ns


def _model(req: dict[str, Any]) -> str:
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    return model


async def ollama_embed(request: web.Request) -> web.Response:
    req = await read_json(request)
    t0 = started_ns()
    ereq = tr.ollama_embed_request(req)
    model = _model(req)
    vectors, tokens, load_ns = await embed(request, model, ereq, parse_keep_alive(req.get("keep_alive")))
    return json_response(tr.ollama_embed_response(model, vectors, tokens, started_ns() - t0, load_ns,
                                                  ereq.dimensions))


async def ollama_embeddings(request: web.Request) -> web.Response:
    """Legacy ``/api/embeddings``: ``{"embedding": [...]}`` for one ``prompt``."""
    req = await read_json(request)
    ereq = tr.ollama_embeddings_request(req)
    vectors, _, _ = await embed(request, _model(req), ereq, parse_keep_alive(req.get("keep_alive")))
    return json_response({"embedding": vectors[0] if vectors else []})


def _default_embedding_model(config: Any) -> str | None:
    """The default model if it embeds, else the first configured model that does (the default is a chat model)."""
    models = config.models.models
    default = config.models.default_model
    if default in models and models[default].serves_embeddings:
        return str(default)
    return next((name for name, m in models.items() if m.serves_embeddings), default)


async def openai_embeddings(request: web.Request) -> web.Response:
    req = await read_json(request)
    ereq = tr.openai_embeddings_request(req)
    if request.app[LAUNCH].protocol == "ollama":  # (Ollama's /v1 truncates an input too long, as its /api/embed)
        ereq = dataclasses.replace(ereq, truncate=True)
    model = req.get("model")
    if model is None and request.app[LAUNCH].protocol == "openai":  # LM Studio: the default (embedding) model
        model = _default_embedding_model(request.app[CONFIG])
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    vectors, tokens, _ = await embed(request, model, ereq)
    return json_response(tr.openai_embeddings_response(model, vectors, tokens, ereq))
