"""The Ollama API (port 11434): routes only parse, call the translators, and stream NDJSON."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import structlog
from aiohttp import web

from bus.protocol import GatewayLaunch
from gateway import audio, catalog, embed_routes, openai_app
from gateway import ollama_models as om
from gateway import ollama_translate as tr
from gateway.errors import ApiError, ollama_error_body, openai_error_body
from gateway.relay import open_stream
from gateway.server import (
    BUS,
    CONFIG,
    FIT_INPUT,
    json_response,
    make_app,
    open_fitting,
    read_json,
    started_ns,
)
from gateway.sse import SSEParser

OLLAMA_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
_enc = msgspec.json.Encoder()
log = structlog.get_logger()


def _ndjson(objs: list[dict[str, Any]]) -> bytes:
    return b"".join(_enc.encode(o) + b"\n" for o in objs)


async def root(_: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(_: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_VERSION})


async def tags(request: web.Request) -> web.Response:
    entries = await catalog.entries(request.app[CONFIG])
    return json_response({"models": [om.tags_entry(e) for e in entries]})


async def show(request: web.Request) -> web.Response:
    req = await read_json(request)
    name = req.get("model") or req.get("name")  # "name": older clients
    if not isinstance(name, str) or not name:
        raise ApiError(400, "model is required", param="model")
    verbose = req.get("verbose")
    if verbose is not None and not isinstance(verbose, bool):
        raise ApiError(400, "invalid verbose: must be a boolean", param="verbose")
    entry = await catalog.entry(request.app[CONFIG], name, present=True)
    return json_response(om.show_response(entry, bool(verbose)))


async def ps(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    status = await request.app[BUS].status()
    by_name = {e.name: e for e in await catalog.entries(config)}
    models = []
    for w in status.workers:
        entry = by_name.get(w.name)
        if entry is None or not om.is_loaded(w):
            continue
        ttl = entry.config.idle_ttl_s
        models.append(om.ps_entry(entry, w, config.app.limits.idle_ttl_s if ttl is None else ttl))
    return json_response({"models": models})


def _unsupported(endpoint: str) -> Any:
    async def handler(_: web.Request) -> web.Response:
        raise om.unsupported(endpoint)

    return handler


def _model(req: dict[str, Any]) -> str:
    model = req.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required", param="model")
    return model


async def chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "generate")


async def _generate(request: web.Request, kind: Literal["chat", "generate"]) -> web.StreamResponse:
    req = await read_json(request)
    model = _model(req)
    t0 = started_ns()
    keep_alive = tr.parse_keep_alive(req.get("keep_alive"))
    if tr.is_load_only(req, kind):  # (any model: `ollama stop` unloads an embedding model so too)
        bus = request.app[BUS]
        if keep_alive == 0:
            await bus.unload(model)
            return json_response(tr.load_response(model, kind, "unload"))
        catalog.require_capability(request.app[CONFIG], model, "load")  # (a whisper model is no Ollama model)
        bus.release((await bus.acquire(model, keep_alive)).request_id)
        return json_response(tr.load_response(model, kind, "load"))
    catalog.require_capability(request.app[CONFIG], model, "chat")
    breq = tr.chat_to_backend(req) if kind == "chat" else tr.generate_to_backend(req)
    if breq.body.get("repeat_last_n") == -1:  # Ollama's "-1 = num_ctx" (llama-server takes no -1)
        breq.body["repeat_last_n"] = catalog.context_size(request.app[CONFIG], model)
    needed = {}
    if tr.thinking_asked(req) not in (None, False):
        needed["thinking"] = "think"
    if breq.body.get("tools"):
        needed["tools"] = "tools"
    if kind == "generate" and req.get("suffix"):  # (fill-in-the-middle: no model here takes it)
        needed["insert"] = "suffix"
    if needed:  # (off the hot path: most requests ask for none)
        await catalog.require_features(request.app[CONFIG], model, needed)
    relay = await open_fitting(request, model, breq.path, breq.body, breq.stream, keep_alive,
                               tr.fit_to_context if req.get("truncate") is not False else None)
    try:
        if not breq.stream:
            try:
                body = msgspec.json.decode(await relay.body())
            except msgspec.DecodeError:
                raise ApiError(502, "llama-server sent an answer that is not JSON", source="backend") from None
            if kind == "chat":
                return json_response(tr.chat_response(model, body, t0, relay.load_ns, echo=tr.prefill(req)))
            return json_response(tr.generate_response(model, body, t0, relay.load_ns))
        resp = await open_stream(request, {"Content-Type": NDJSON})
        parser = SSEParser()
        conv = tr.OllamaStream(model, kind, t0, relay.load_ns, echo=tr.prefill(req) if kind == "chat" else "")
        await relay.stream_to(resp, lambda chunk: conv.feed_sse(parser, chunk),
                              lambda err: _ndjson([ollama_error_body(err)]),  # Ollama's clients read an {"error"} line
                              lambda: _ndjson([conv.finish()]))
        return resp
    finally:
        await relay.close()


def build(launch: GatewayLaunch) -> web.Application:
    # Ollama serves OpenAI's API under /v1 too: those routes answer errors in OpenAI's shape.
    app = make_app(launch, ollama_error_body, {"/v1/": openai_error_body})
    r = app.router
    r.add_get("/", root)  # aiohttp answers HEAD for GET routes
    r.add_get("/api/version", version)
    r.add_get("/api/tags", tags)
    r.add_post("/api/show", show)
    r.add_get("/api/ps", ps)
    r.add_post("/api/chat", chat)
    r.add_post("/api/generate", generate)
    r.add_post("/api/embed", embed_routes.ollama_embed)
    r.add_post("/api/embeddings", embed_routes.ollama_embeddings)
    for endpoint in ("pull", "push", "create", "copy"):
        r.add_post(f"/api/{endpoint}", _unsupported(endpoint))
    r.add_delete("/api/delete", _unsupported("delete"))
    r.add_route("*", "/api/blobs/{digest}", _unsupported("blobs"))
    openai_app.add_v1_routes(app)
    app[FIT_INPUT] = tr.fit_to_context  # (its /v1 too: Ollama truncates an input too long there as on /api/chat)
    audio.add_routes(app)  # speech to text
    return app
