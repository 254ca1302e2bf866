"""OpenAI's speech-to-text API on both gateways: ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations``.

Routes only parse (gateway/audio_upload.py), send one ``TranscribeJob`` to a whisper worker (the audio as a
binary frame), and render its JSON lines (gateway/audio_format.py) as json, text, srt, vtt, verbose_json, or
SSE ``transcript.text.delta`` events as segments are decoded (``stream=true``). Errors are always in OpenAI's
shape, on the Ollama port too. Register with ``add_routes(app)`` in an app's ``build()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from aiohttp import web

from bus.protocol import TranscribeJob
from config.loader import Config
from gateway import audio_format as fmt
from gateway.audio_upload import AudioRequest, describe, parse_request, read_upload
from gateway.errors import ApiError, openai_error_body
from gateway.relay import Relay
from gateway.server import CONFIG, LAUNCH, json_response, open_relay

log = structlog.get_logger()

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/translations", translations)


async def transcriptions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "transcribe")


async def translations(request: web.Request) -> web.StreamResponse:
    return await _handle(request, "translate")


def _error(err: ApiError) -> web.Response:
    resp = json_response(openai_error_body(err), err.status)
    if err.status in (429, 503):
        resp.headers["Retry-After"] = "1"
    return resp


def whisper_model(config: Config, name: str) -> str:
    """The configured whisper model for a request's ``model`` (empty: the first whisper model)."""
    if not name:
        for key, model in config.models.models.items():
            if model.type == "whisper":
                return key
        raise ApiError(400, "model is required (no whisper model is configured)", param="model")
    resolved = config.resolve_model(name)
    if resolved is None:
        raise ApiError(404, f"model {name!r} not found", code="model_not_found", param="model")
    model = config.models.models[resolved]
    if model.type != "whisper":
        raise ApiError(400, f"model {name!r} is not a speech-to-text model (it is a {model.type} model): "
                       "use a whisper model for /v1/audio", code="wrong_model_type", param="model")
    return resolved


async def _handle(request: web.Request, task: str) -> web.StreamResponse:
    config = request.app[CONFIG]
    limits = config.app.limits
    try:
        try:  # the whole upload is read before a worker is asked for: a slow client holds no slot
            async with asyncio.timeout(limits.read_timeout_s):
                upload = await read_upload(request, limits.max_upload_bytes)
        except TimeoutError:
            raise ApiError(408, f"the upload did not arrive within {limits.read_timeout_s:g}s "
                           "(limits.read_timeout_s)", code="request_timeout") from None
        req = parse_request(upload, task)
        model = whisper_model(config, req.model)
        log.info("audio_request", **describe(req))
        relay = await _open(request, model, req)
    except ApiError as err:
        return _error(err)
    try:
        if req.stream:
            return await _stream(request, relay)
        t = fmt.Transcript()
        try:
            async for chunk in relay.chunks():
                t.feed(chunk)
        except ApiError as err:
            return _error(err)
        body, ctype = fmt.render(t, req.response_format, task, words=req.word_timestamps,
                                 segments=not req.granularities or "segment" in req.granularities)
        return web.Response(body=body, headers={"Content-Type": ctype})
    finally:
        await relay.close()


def _job(config: Config, model: str, req: AudioRequest, route: str, gateway: str) -> Callable[[str], TranscribeJob]:
    w = config.models.models[model].whisper

    def make(rid: str) -> TranscribeJob:
        return TranscribeJob(request_id=rid, audio=req.audio, task=req.task, language=req.language or w.language,
                             prompt=req.prompt, temperature=req.temperature, word_timestamps=req.word_timestamps,
                             beam_size=w.beam_size, stream=req.stream, route=route, gateway=gateway)

    return make


async def _open(request: web.Request, model: str, req: AudioRequest) -> Relay:
    """Send the job; returns its relay once the worker answered its head (retried if the worker vanished)."""
    make = _job(request.app[CONFIG], model, req, request.path, request.app[LAUNCH].protocol)
    return await open_relay(request, model, make, kind="whisper")


async def _stream(request: web.Request, relay: Relay) -> web.StreamResponse:
    """SSE: one ``transcript.text.delta`` per decoded segment, then ``transcript.text.done``."""
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    t = fmt.Transcript()
    try:
        async for chunk in relay.chunks():
            before = len(t.segments)
            out = [fmt.delta_event(seg, first=before + i == 0) for i, seg in enumerate(t.feed(chunk))]
            if out:
                await resp.write(b"".join(out))
        await resp.write(fmt.done_event(t))
    except ApiError as err:  # mid-stream: an error event, as OpenAI's clients read it
        await resp.write(fmt.sse(openai_error_body(err)))
    await resp.write_eof()
    return resp
