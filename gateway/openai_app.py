"""The OpenAI / LM Studio API (port 1234): routes only parse, call the translators, and relay SSE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from bus.protocol import GatewayLaunch
from gateway import audio, embed_routes
from gateway import openai_translate as tr
from gateway.catalog import require_capability, require_features, require_media
from gateway.errors import ApiError, openai_error_body
from gateway.relay import open_stream
from gateway.response_store import ResponseStore, input_items
from gateway.server import (
    CONFIG,
    FIT_INPUT,
    LAUNCH,
    json_response,
    make_app,
    model_files,
    open_fitting,
    read_json,
)
from gateway.sse import SSEParser

_enc = msgspec.json.Encoder()
RESPONSES: web.AppKey[ResponseStore] = web.AppKey("responses", ResponseStore)  # this port's stored responses


def _model_object(name: str, mtime: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(mtime), "owned_by": "llama-runner"}


OPENAI_KINDS = ("llama", "whisper")  # OpenAI lists its speech models too (whisper-1)


async def models(request: web.Request) -> web.Response:
    data = [_model_object(name, mtime) for name, (_path, mtime, _size) in model_files(request.app[CONFIG], OPENAI_KINDS).items()]
    return json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    """``/v1/models/{id}``: a configured name or alias (answered under the name asked for)."""
    name = request.match_info["model"]
    config = request.app[CONFIG]
    resolved = config.resolve_model(name)
    files = model_files(config, OPENAI_KINDS)
    if resolved is None or resolved not in files:
        raise ApiError(404, f"The model '{name}' does not exist", code="model_not_found", param="model")
    return json_response(_model_object(name, files[resolved][1]))


def request_model(request: web.Request, req: dict[str, Any]) -> str:
    """The request's ``model``, else the configured ``default_model`` (LM Studio's behaviour)."""
    model = req.get("model")
    if isinstance(model, str) and model:
        return model
    default = request.app[CONFIG].models.default_model
    if default:
        return default
    raise ApiError(400, "model is required", param="model")


def with_default_model(request: web.Request, req: dict[str, Any]) -> dict[str, Any]:
    """On the LM Studio port a request without ``model`` goes to ``default_model`` (LM Studio answers with
    the loaded model); on the Ollama port, as in Ollama, ``model`` stays required."""
    if req.get("model") is None and request.app[LAUNCH].protocol == "openai":
        default = request.app[CONFIG].models.default_model
        if default:
            return {**req, "model": default}
    return req


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = with_default_model(request, await read_json(request))
    breq = tr.chat_to_backend(req)
    model = request_model(request, req)
    if breq.media:
        require_media(request.app[CONFIG], model, breq.media)
    await require_asked_features(request, model, breq.body)
    echo = tr.prefill(req)
    return await relay_openai(request, model, breq.path, breq.body, breq.stream,
                              tr.Unecho(echo).convert if echo else None)


async def require_asked_features(request: web.Request, model: str, body: dict[str, Any]) -> None:
    """Tools (or functions) for a model whose chat template takes none are a 400: llama-server ignores them (a
    plain answer where a tool call was asked for, "required" or not); Ollama refuses so, on its /v1 too. So is a
    completion's ``suffix`` (fill-in-the-middle) for a model that cannot insert (llama-server ignored it), and a
    ``reasoning_effort`` for a model that does not think."""
    needed = {}
    field = "tools" if body.get("tools") else "functions" if body.get("functions") else ""
    if field:
        needed["tools"] = field
    if body.get("suffix"):
        needed["insert"] = "suffix"
    if tr.thinking_asked(body):
        needed["thinking"] = "reasoning_effort"
    if needed:
        await require_features(request.app[CONFIG], model, needed)


async def responses(request: web.Request) -> web.StreamResponse:
    """OpenAI's Responses API, served by llama-server itself; its stream's named events completed for the openai
    SDK (tr.ResponsesStream)."""
    req = with_default_model(request, await read_json(request))
    breq = tr.responses_to_backend(req)
    model = request_model(request, req)
    if breq.media:
        require_media(request.app[CONFIG], model, breq.media, param="input")
    await require_asked_features(request, model, breq.body)
    store = request.app[RESPONSES]
    previous, keep = breq.body.pop("previous_response_id", None), breq.body.pop("store", True)
    conversation = own = input_items(breq.body["input"])
    if previous is not None:  # (llama-server keeps no responses: the conversation so far goes before the input)
        conversation = breq.body["input"] = store.conversation(previous) + conversation

    fields = tr.response_fields(req)

    def completed(doc: dict[str, Any]) -> dict[str, Any]:
        """A finished response: kept for a ``previous_response_id`` to come (unless ``store`` is false)."""
        doc["previous_response_id"], doc["store"] = previous, keep
        tr.fill_response(doc, fields)
        output, rid = doc.get("output"), doc.get("id")
        if keep and isinstance(rid, str) and isinstance(output, list) and doc.get("status") == "completed":
            store.put(rid, conversation + output, doc, own)
        return doc

    return await relay_openai(request, model, breq.path, breq.body, breq.stream, completed, events=fields)


async def stored_response(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}``: a response kept by ``store`` (404 if this port has none by that id)."""
    return json_response(request.app[RESPONSES].response(request.match_info["id"]))


async def response_input_items(request: web.Request) -> web.Response:
    """``GET /v1/responses/{id}/input_items``: the input items of a stored response's request, a page at a time."""
    return json_response(request.app[RESPONSES].input_items(request.match_info["id"], request.query))


async def delete_response(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    request.app[RESPONSES].delete(rid)
    return json_response({"id": rid, "object": "response.deleted", "deleted": True})


async def completions(request: web.Request) -> web.StreamResponse:
    req = with_default_model(request, await read_json(request))
    breq = tr.completions_to_backend(req)
    model = request_model(request, req)
    await require_asked_features(request, model, breq.body)
    legacy = tr.LegacyCompletion(req)
    return await relay_openai(request, model, breq.path, breq.body, breq.stream,
                              legacy.stream_chunks if breq.stream else legacy.convert)


Transform = Callable[[dict[str, Any]], Any]  # a reply (or a chunk) reshaped; in a stream, a list: several, or none


def pop_ttl(body: dict[str, Any]) -> float | None:
    """LM Studio's per-request ``ttl``: seconds the model stays loaded once idle (-1: forever)."""
    ttl = body.pop("ttl", None)
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (ttl >= 0 or ttl == -1) or ttl > 1e9:
        raise ApiError(400, "ttl must be a number of seconds (>= 0, or -1 to keep the model loaded)", param="ttl")
    return float(ttl)


async def relay_openai(request: web.Request, model: str, path: str, body: dict[str, Any], stream: bool,
                       transform: Transform | None = None, events: dict[str, Any] | None = None
                       ) -> web.StreamResponse:
    """Send an OpenAI-style request to ``model``'s llama-server and relay its answer (JSON or SSE), under
    the model name asked for; ``transform`` may change each reply object / stream chunk (LM Studio's stats);
    ``events``: a Responses API stream (named events), its response objects completed with these fields. A stream
    of several choices is put in order (tr.ChoiceStream)."""
    require_capability(request.app[CONFIG], model, "chat")
    keep_alive = pop_ttl(body)
    fit = request.app.get(FIT_INPUT) if events is None else None  # (the Ollama port: its /v1 inputs are cut to fit)
    relay = await open_fitting(request, model, path, body, stream, keep_alive, fit)
    try:
        rename = model != relay.worker  # the backend answers with the configured name
        if not stream:
            raw = await relay.body()
            if rename or transform is not None:
                try:
                    doc = tr.rewrite_model(msgspec.json.decode(raw), model)
                    raw = _enc.encode(transform(doc) if transform is not None and isinstance(doc, dict) else doc)
                except msgspec.DecodeError:
                    pass
            return web.Response(body=raw, content_type="application/json")
        resp = await open_stream(request, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if events is not None:
            conv = tr.ResponsesStream(model if rename else None, model, completed=transform, fields=events)
            await relay.stream_to(resp, conv.feed, lambda err: conv.failed(openai_error_body(err)["error"]),
                                  conv.flush)
            return resp
        choices = tr.ChoiceStream() if tr.several_choices(body) else None
        parser = SSEParser() if rename or transform is not None or choices is not None else None

        def convert(chunk: bytes) -> bytes:
            return chunk if parser is None else _renamed(parser, chunk, model, transform, choices)

        await relay.stream_to(resp, convert, _sse_error)
        return resp
    finally:
        await relay.close()


def _sse_error(err: ApiError) -> bytes:
    return b"data: " + _enc.encode(openai_error_body(err)) + b"\n\n"


def _renamed(parser: SSEParser, chunk: bytes, model: str, transform: Transform | None = None,
             choices: tr.ChoiceStream | None = None) -> bytes:
    out = []
    for payload in parser.feed(chunk):
        try:
            doc = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            out.append(b"data: " + payload + b"\n\n")
            continue
        for each in choices.push(doc) if choices is not None else (doc,):
            out.extend(_events(_shaped(each, model, transform)))
    if parser.done:
        for each in choices.finish() if choices is not None else ():
            out.extend(_events(_shaped(each, model, transform)))
        out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def _events(shaped: Any) -> list[bytes]:
    """SSE events of a shaped chunk: a transform may make it several chunks, or none (a list)."""
    return [b"data: " + _enc.encode(one) + b"\n\n" for one in (shaped if isinstance(shaped, list) else (shaped,))]


def _shaped(doc: Any, model: str, transform: Transform | None) -> Any:
    if not isinstance(doc, dict):
        return doc
    doc = tr.rewrite_model(doc, model)
    return transform(doc) if transform is not None and "error" not in doc else doc


def add_v1_routes(app: web.Application) -> None:
    """OpenAI's ``/v1/*`` routes (also served on the Ollama port, as Ollama does)."""
    r = app.router
    r.add_get("/v1/models", models)
    r.add_get("/v1/models/{model:.+}", retrieve_model)
    r.add_post("/v1/chat/completions", chat_completions)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/responses", responses)
    r.add_get("/v1/responses/{id}", stored_response)
    r.add_get("/v1/responses/{id}/input_items", response_input_items)
    r.add_delete("/v1/responses/{id}", delete_response)
    app[RESPONSES] = ResponseStore()
    r.add_post("/v1/embeddings", embed_routes.openai_embeddings)


def build(launch: GatewayLaunch) -> web.Application:
    from gateway import lmstudio  # it builds on this module's relay

    app = make_app(launch, openai_error_body)
    add_v1_routes(app)
    lmstudio.add_routes(app)  # LM Studio's REST API v0
    audio.add_routes(app)  # speech to text
    return app
