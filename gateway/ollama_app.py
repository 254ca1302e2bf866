"""The Ollama API (port 11434): routes only parse, call the translators, and stream NDJSON."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from aiohttp import web

from bus.protocol import GatewayLaunch
from gateway import ollama_translate as tr
from gateway.errors import ApiError, ollama_error_body
from gateway.server import BUS, CONFIG, json_response, make_app, model_files, open_job, read_json, started_ns
from gateway.sse import SSEParser

OLLAMA_VERSION = "0.12.6"
NDJSON = "application/x-ndjson"
_enc = msgspec.json.Encoder()


def _ndjson(objs: list[dict[str, Any]]) -> bytes:
    return b"".join(_enc.encode(o) + b"\n" for o in objs)


def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def root(_: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(_: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_VERSION})


async def tags(request: web.Request) -> web.Response:
    models = []
    for name, (path, mtime, size) in model_files(request.app[CONFIG]).items():
        models.append({
            "name": name, "model": name, "modified_at": _rfc3339(mtime), "size": size,
            "digest": hashlib.sha256(f"{path}:{size}:{mtime}".encode()).hexdigest(),
            "details": {"parent_model": "", "format": "gguf", "family": "", "families": None,
                        "parameter_size": "", "quantization_level": ""},
        })
    return json_response({"models": models})


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
    if tr.is_load_only(req, kind):
        bus = request.app[BUS]
        if keep_alive == 0:
            await bus.unload(model)
            return json_response(tr.load_response(model, kind, "unload"))
        bus.release((await bus.acquire(model, keep_alive)).request_id)
        return json_response(tr.load_response(model, kind, "load"))
    breq = tr.chat_to_backend(req) if kind == "chat" else tr.generate_to_backend(req)
    relay = await open_job(request, model, breq.path, breq.body, breq.stream, keep_alive)
    try:
        if not breq.stream:
            try:
                body = msgspec.json.decode(await relay.body())
            except msgspec.DecodeError:
                raise ApiError(502, "llama-server sent an answer that is not JSON", source="backend") from None
            make = tr.chat_response if kind == "chat" else tr.generate_response
            return json_response(make(model, body, t0, relay.load_ns))
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        parser = SSEParser()
        conv = tr.OllamaStream(model, kind, t0, relay.load_ns)
        try:
            async for chunk in relay.chunks():
                out: list[dict[str, Any]] = []
                for payload in parser.feed(chunk):
                    try:
                        obj = msgspec.json.decode(payload)
                    except msgspec.DecodeError:
                        continue
                    if isinstance(obj, dict) and "error" in obj:
                        raise ApiError(500, str(obj["error"]), source="backend")
                    if isinstance(obj, dict):
                        out.extend(conv.feed(obj))
                if out:
                    await resp.write(_ndjson(out))
            await resp.write(_ndjson([conv.finish()]))
        except ApiError as err:  # mid-stream: Ollama's clients read an {"error"} line
            await resp.write(_ndjson([ollama_error_body(err)]))
        await resp.write_eof()
        return resp
    finally:
        await relay.close()


def build(launch: GatewayLaunch) -> web.Application:
    app = make_app(launch, ollama_error_body)
    r = app.router
    r.add_get("/", root)  # aiohttp answers HEAD for GET routes
    r.add_get("/api/version", version)
    r.add_get("/api/tags", tags)
    r.add_post("/api/chat", chat)
    r.add_post("/api/generate", generate)
    __import__("gateway.audio").audio.add_routes(app)  # speech to text (gateway/audio.py)
    return app
