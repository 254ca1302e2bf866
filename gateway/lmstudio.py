"""LM Studio's REST API v0 (port 1234): ``/api/v0/models[/{id}]``, ``/api/v0/chat/completions``,
``/api/v0/completions``, ``/api/v0/embeddings``.

The same OpenAI-shaped requests and replies as ``/v1``, plus LM Studio's extras: rich model objects
(type, publisher, arch, quantization, loaded state, max context) and, on completions, ``stats``
(tokens/s, time to first token, generation time, stop reason), ``model_info`` and ``runtime``, taken from
llama-server's ``timings``. A request without ``model`` goes to the configured ``default_model``.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from bus.protocol import WorkerState
from gateway import catalog, embed_routes, openai_app
from gateway import openai_translate as tr
from gateway.catalog import ModelEntry
from gateway.errors import ApiError
from gateway.server import BUS, CONFIG, json_response, read_json

__all__ = ["V0Extras", "add_routes", "model_object", "stats", "stop_reason"]

_STOP_REASONS = {"stop": "eosFound", "length": "maxPredictedTokensReached", "tool_calls": "toolCalls",
                 "function_call": "toolCalls", "content_filter": "userStopped"}


@functools.cache
def runtime() -> dict[str, Any]:
    """The ``runtime`` of LM Studio's v0 answers. Made on first use: importlib.metadata and the scan of the
    installed distributions cost an idle gateway ~1 MB otherwise."""
    from importlib import metadata

    try:
        version = metadata.version("llama-runner")
    except metadata.PackageNotFoundError:
        version = "0"
    return {"name": "llama.cpp-llama-server", "version": version, "supported_formats": ["gguf"]}


def model_object(e: ModelEntry, loaded: bool) -> dict[str, Any]:
    """One model as ``/api/v0/models`` lists it: ``max_context_length`` is the model's (trained),
    ``loaded_context_length`` the one it runs with (clients budget their prompts on it)."""
    out: dict[str, Any] = {
        "id": e.name,
        "object": "model",
        "type": "embeddings" if e.config.mode == "embedding" else "llm",
        "publisher": e.facts.organization or "local",
        "arch": e.facts.architecture,
        "compatibility_type": "gguf",
        "quantization": e.facts.quantization,
        "state": "loaded" if loaded else "not-loaded",
        "max_context_length": e.facts.context_length or e.ctx_size,
    }
    if loaded:
        out["loaded_context_length"] = e.ctx_size
    out["capabilities"] = ["tool_use"] if "tools" in e.capabilities else []
    return out


def stop_reason(finish_reason: Any) -> str:
    """OpenAI ``finish_reason`` -> LM Studio ``stop_reason``."""
    return _STOP_REASONS.get(finish_reason, "eosFound") if isinstance(finish_reason, str) else "eosFound"


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def stats(timings: dict[str, Any], finish_reason: Any) -> dict[str, Any]:
    """LM Studio's ``stats`` from llama-server's ``timings`` (ms): time to first token is the prompt's
    processing time, generation time the time spent predicting."""
    return {
        "tokens_per_second": _num(timings.get("predicted_per_second")),
        "time_to_first_token": _num(timings.get("prompt_ms")) / 1000,
        "generation_time": _num(timings.get("predicted_ms")) / 1000,
        "stop_reason": stop_reason(finish_reason),
    }


class V0Extras:
    """Adds ``stats``, ``model_info`` and ``runtime`` to the reply (or the stream chunk) that carries
    llama-server's ``timings``; remembers the ``finish_reason`` of earlier chunks."""

    def __init__(self, e: ModelEntry) -> None:
        self.model_info = {"arch": e.facts.architecture, "quant": e.facts.quantization, "format": "gguf",
                           "context_length": e.ctx_size}
        self.finish_reason: Any = None

    def __call__(self, doc: dict[str, Any]) -> dict[str, Any]:
        choices = doc.get("choices")
        if isinstance(choices, list):
            for c in choices:
                if isinstance(c, dict) and c.get("finish_reason"):
                    self.finish_reason = c["finish_reason"]
        timings = doc.get("timings")
        if isinstance(timings, dict):
            doc["stats"] = stats(timings, self.finish_reason)
            doc["model_info"] = self.model_info
            doc["runtime"] = runtime()
        return doc


async def _loaded(request: web.Request) -> set[str]:
    try:
        status = await request.app[BUS].status()
    except ApiError:
        return set()
    return {w.name for w in status.workers if w.state == WorkerState.READY}


async def models(request: web.Request) -> web.Response:
    loaded = await _loaded(request)
    entries = await catalog.entries(request.app[CONFIG])
    return json_response({"object": "list", "data": [model_object(e, e.name in loaded) for e in entries]})


async def model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    e = await catalog.entry(request.app[CONFIG], name, present=True)
    doc = model_object(e, e.name in await _loaded(request))
    doc["id"] = name
    return json_response(doc)


async def _completion(request: web.Request, chat: bool) -> web.StreamResponse:
    config = request.app[CONFIG]
    req = openai_app.with_default_model(request, await read_json(request))
    breq = tr.chat_to_backend(req) if chat else tr.completions_to_backend(req)
    name = req["model"]
    catalog.require_capability(config, name, "chat")
    if breq.media:
        catalog.require_media(config, name, breq.media)
    await openai_app.require_asked_features(request, name, breq.body)
    e = await catalog.entry(config, name)
    extras = V0Extras(e)
    if chat:  # (a chat continuing an assistant's words answers the new words only)
        echo = tr.prefill(req)
        before = tr.Unecho(echo).convert if echo else None
    else:  # (a completion in the legacy shape)
        before = tr.LegacyCompletion(req).convert
    return await openai_app.relay_openai(request, name, breq.path, breq.body, breq.stream,
                                         extras if before is None else lambda doc: extras(before(doc)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, chat=False)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v0/models", models)
    r.add_get("/api/v0/models/{model:.+}", model)
    r.add_post("/api/v0/chat/completions", chat_completions)
    r.add_post("/api/v0/completions", completions)
    r.add_post("/api/v0/embeddings", embed_routes.openai_embeddings)
