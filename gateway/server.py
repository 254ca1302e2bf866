"""What both gateways share: the aiohttp app around the bus, error middleware, run until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq.asyncio
from aiohttp import web

from bus.protocol import GatewayLaunch, HttpJob, Job
from config.loader import Config, ConfigError, load_accepted
from config.schema import ProxyConfig
from gateway import metrics as gateway_metrics
from gateway import request_limits, security
from gateway.bus_client import GatewayBus
from gateway.errors import ApiError, ContextOverflow, log_failure, ollama_error_body
from gateway.grammar_check import check_constraints
from gateway.listen import drain_times
from gateway.relay import Relay, backend_error

log = structlog.get_logger()

BUS: web.AppKey[GatewayBus] = web.AppKey("bus", GatewayBus)
LAUNCH: web.AppKey[GatewayLaunch] = web.AppKey("launch", GatewayLaunch)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)

ErrorShape = Callable[[ApiError], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Answer = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]
OnPrepare = Callable[[web.Request, web.StreamResponse], Awaitable[None]]
# What stands before every route (the middleware's checks and error shapes) and what every answer gets when it
# starts (CORS, counted streams): kept on the app for gateway/fast_http.py, which answers the hot routes itself.
ANSWER: web.AppKey[Answer] = web.AppKey("answer")
ON_PREPARE: web.AppKey[OnPrepare] = web.AppKey("on_prepare")


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, read within the limits (time, bytes, messages, prompt length)."""
    limits = request.app[CONFIG].app.limits
    raw = await security.read_body(request, limits.read_timeout_s, limits.max_body_bytes)
    if not raw.strip():
        raise ApiError(400, "request body is empty; expected a JSON object")
    try:
        doc = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        doc = _with_lone_surrogates(raw)
        if doc is None:
            raise ApiError(400, f"invalid JSON in request body: {exc}") from None
    except UnicodeDecodeError:  # msgspec's answer to invalid UTF-8 inside a string (its offset: in the string)
        try:
            raw.decode()
            at = "?"
        except UnicodeDecodeError as exc:
            at = str(exc.start)
        raise ApiError(400, f"invalid UTF-8 in request body at byte {at}") from None
    except RecursionError:
        raise ApiError(400, "JSON in request body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a JSON object")
    request_limits.check(doc, limits)
    return doc


def _with_lone_surrogates(raw: bytes) -> Any:
    """JSON whose strings escape half a surrogate pair (``"\\ud800"``: Python's json.dumps writes them for a
    string so made), each read as U+FFFD, as Ollama's and OpenAI's JSON readers read them; None: it is not."""
    if b"\\u" not in raw.lower():
        return None
    import json

    def no_constant(name: str) -> Any:  # (NaN, Infinity: not JSON, as msgspec reads it)
        raise ValueError(name)

    try:
        doc = json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError):
        return None

    def fix(v: Any) -> Any:
        if isinstance(v, str):
            return v.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {fix(k): fix(x) for k, x in v.items()}
        return v

    try:
        return fix(doc)
    except RecursionError:
        return None


def json_response(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(doc), status=status, content_type="application/json")


RETRY_AFTER_S = 1  # told to clients on 429 / 503 (overloaded, loading, supervisor away)


def error_response(shape: ErrorShape, err: ApiError) -> web.Response:
    status = err.status
    if status == 429 and shape is ollama_error_body:  # (Ollama answers a full queue 503, "server busy")
        status = 503
    resp = json_response(shape(err), status)
    if err.status in (429, 503):
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    elif err.code == "load_failed":  # (the openai client's own header: trying the load again fails again)
        resp.headers["x-should-retry"] = "false"
    return resp


def shape_resolver(shape: ErrorShape, path_shapes: dict[str, ErrorShape] | None = None
                   ) -> Callable[[str], ErrorShape]:
    """The error shape of a path: ``shape``, or the shape of the longest ``path_shapes`` prefix it starts with."""
    prefixes = sorted((path_shapes or {}).items(), key=lambda kv: -len(kv[0]))

    def shape_for(path: str) -> ErrorShape:
        return next((s for prefix, s in prefixes if path.startswith(prefix) or path == prefix.rstrip("/")), shape)

    return shape_for


async def shaped(request: web.Request, handler: Handler, shape_for: Callable[[str], ErrorShape]
                 ) -> web.StreamResponse:
    """``handler``'s answer, every error answered in the protocol's shape (redirects, a client gone: raised)."""
    try:
        return await handler(request)
    except ApiError as err:
        log_failure(err, path=request.path)
        return error_response(shape_for(request.path), err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = {404: f"path {request.path} not found", 405: f"method {request.method} not allowed on "
                  f"{request.path}", 413: "request body too large"}.get(exc.status, exc.reason)
        resp = error_response(shape_for(request.path), ApiError(exc.status, reason))
        if "Allow" in exc.headers:  # (a 405 names the methods the path takes)
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("handler_failed", path=request.path)
        return error_response(shape_for(request.path), ApiError(500, "internal error in llama-runner"))


def error_middleware(shape: ErrorShape, path_shapes: dict[str, ErrorShape] | None = None) -> Any:
    """Answer every error in the protocol's shape: ``shape``, or the shape of the first ``path_shapes``
    prefix the path starts with (the Ollama port serves OpenAI's ``/v1/*`` with OpenAI's errors)."""
    shape_for = shape_resolver(shape, path_shapes)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await shaped(request, handler, shape_for)

    return middleware


def gateway_answer(stats: gateway_metrics.GatewayStats, origins: security.Getter, keys: security.Getter,
                   shape_for: Callable[[str], ErrorShape], open_paths: frozenset[str],
                   listen_host: str = "127.0.0.1") -> Answer:
    """What stands before every route, in one function of plain checks (each layer of aiohttp middleware costs
    a coroutine and a wrapper per request: four of them were ~10-15% of a gateway's CPU for a tiny request).

    In order: counted (every answer, errors included); a CORS preflight from an allowed origin answered; the API
    key checked; then the route, its errors answered in the protocol's shape."""

    def unauthorized(request: web.Request, err: ApiError) -> web.Response:
        return error_response(shape_for(request.path), err)

    async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
        stats.begin()
        status = 500
        try:
            foreign = security.host_refusal(request, listen_host)
            early = unauthorized(request, foreign) if foreign else security.preflight_answer(request, origins(request))
            if early is None and security.is_preflight(request):  # (a preflight from an origin not let in: it
                # was routed as any OPTIONS, a 405; refused as Ollama refuses it)
                early = unauthorized(request, ApiError(
                    403, f"origin {request.headers.get('Origin')!r} is not allowed (cors_origins of this port in "
                    "app_config.json)", code="origin_not_allowed"))
            if early is None:
                early = security.refusal(request, keys(request), unauthorized, open_paths)
            resp = early if early is not None else await shaped(request, handler, shape_for)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 0  # the client went away
            raise
        finally:
            stats.end(request, status)

    return answer


def gateway_middleware(answer: Answer) -> Any:
    """``answer`` as the app's one middleware."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await answer(request, handler)

    return middleware


# A job that failed before the backend answered, because its worker went away (crash, restart, eviction),
# never started: it is sent again to the model's next worker instead of failing the client.
RETRIES_BEFORE_HEAD = 2


def _retriable(err: ApiError) -> bool:
    """Sent again to the model's next worker: its worker died or was replaced before answering. Not when it was
    stopped (an operator's stop or restart, a shutdown: every automatic stop waits for the model's leases to end,
    so a job meets a stopping worker only then): sent again, the stopped model loaded again for it."""
    return err.code == "backend_exited" or (err.code.startswith("worker_") and err.code != "worker_stopping")


async def open_job(request: web.Request, model: str, path: str, body: dict[str, Any], stream: bool,
                   keep_alive: float | None = None) -> Relay:
    """Send an HTTP job for ``model``'s llama-server; returns its relay with the backend's head checked (< 400)."""
    check_constraints(body)  # (a schema or grammar llama-server would never return from)
    payload = msgspec.json.encode(body)
    route, gateway = request.path, request.app[LAUNCH].protocol
    return await open_relay(request, model, lambda rid: HttpJob(request_id=rid, path=path, body=payload,
                                                                stream=stream, route=route, gateway=gateway),
                            keep_alive=keep_alive)


Fit = Callable[[dict[str, Any], int, int], "dict[str, Any] | None"]  # (body, prompt tokens, context) -> shorter body
# An app whose chat and completion inputs too long for the context are shortened (the Ollama port, /v1 too: Ollama
# truncates by default); unset: llama-server's 400 context_length_exceeded, as OpenAI's
FIT_INPUT: web.AppKey[Fit] = web.AppKey("fit_input")
TRUNCATE_TRIES = 8


async def open_fitting(request: web.Request, model: str, path: str, body: dict[str, Any], stream: bool,
                       keep_alive: float | None = None, fit: Fit | None = None) -> Relay:
    """``open_job``; an input too long for the model's context is shortened by ``fit`` (Ollama's truncation: a
    chat's oldest messages go, then the beginning of its latest one; a prompt's beginning) and sent again."""
    if fit is not None:
        for _ in range(TRUNCATE_TRIES):
            try:
                return await open_job(request, model, path, body, stream, keep_alive)
            except ContextOverflow as err:
                shorter = fit(body, err.prompt_tokens, err.ctx)
                if shorter is None:
                    raise
                log.info("input_truncated", model=model, prompt_tokens=err.prompt_tokens, ctx=err.ctx)
                body = shorter
    return await open_job(request, model, path, body, stream, keep_alive)


async def open_relay(request: web.Request, model: str, make_job: Callable[[str], Job], *, kind: str | None = None,
                     keep_alive: float | None = None) -> Relay:
    """Send the job ``make_job(request_id)`` to a worker of ``model`` (of ``kind``, if given); returns its relay
    once the worker answered its head (< 400). A job whose worker went away before answering is retried."""
    bus = request.app[BUS]
    launch = request.app[LAUNCH]
    t0 = time.monotonic_ns()
    for attempt in range(RETRIES_BEFORE_HEAD + 1):
        ch = await bus.open_with(model, make_job, kind=kind, keep_alive=keep_alive)
        relay = Relay(bus, ch, launch.request_timeout_s)
        relay.load_ns = time.monotonic_ns() - t0
        try:
            head = await relay.head()
            if head.status >= 400:
                raise backend_error(head.status, await relay.body())
        except ApiError as err:
            await relay.close()
            if attempt < RETRIES_BEFORE_HEAD and _retriable(err):
                log.info("job_retry", model=model, reason=err.message)
                bus.invalidate(relay.worker)  # ask the supervisor for the model's next worker
                continue
            raise
        except BaseException:
            await relay.close()
            raise
        return relay
    raise AssertionError("unreachable")


def started_ns() -> int:
    return time.monotonic_ns()


# Open without an API key on the Ollama port: the health check ("Ollama is running").
OPEN_PATHS = {"ollama": frozenset({"/"})}


def proxy_config(config: Config, protocol: str) -> ProxyConfig:
    """This gateway's section of ``proxies``: ``ollama``, or ``lmstudio`` for the OpenAI port."""
    return config.app.proxies.ollama if protocol == "ollama" else config.app.proxies.lmstudio


def make_app(launch: GatewayLaunch, shape: ErrorShape,
             path_shapes: dict[str, ErrorShape] | None = None) -> web.Application:
    try:
        config = load_accepted(launch.run_dir, launch.config_dir or None)
    except ConfigError as exc:
        raise SystemExit(f"config error: {exc}") from None
    shape_for = shape_resolver(shape, path_shapes)

    def keys(request: web.Request) -> list[str]:
        return proxy_config(request.app[CONFIG], launch.protocol).api_keys

    def origins(request: web.Request) -> list[str]:
        return proxy_config(request.app[CONFIG], launch.protocol).cors_origins

    stats = gateway_metrics.GatewayStats(launch)
    answer = gateway_answer(stats, origins, keys, shape_for, OPEN_PATHS.get(launch.protocol, frozenset()),
                            launch.host)
    # client_max_size guards aiohttp's own readers too (read_json reads with the live limit itself).
    app = web.Application(middlewares=[gateway_middleware(answer)], client_max_size=config.app.limits.max_body_bytes)
    app[LAUNCH] = launch
    app[CONFIG] = config
    app[ANSWER] = answer

    async def on_prepare(request: web.Request, resp: web.StreamResponse) -> None:
        stats.prepared(request, resp)
        security.add_cors_headers(request, resp, origins(request))

    app[ON_PREPARE] = on_prepare
    app.on_response_prepare.append(on_prepare)
    bus = GatewayBus(launch.run_dir, launch.load_timeout_s, name=f"gateway-{launch.protocol}",
                     ctx=zmq.asyncio.Context.instance())
    app[BUS] = bus
    gateway_metrics.install(app, stats)  # GatewayMetrics on the bus every second

    def reload_config() -> None:
        try:
            app[CONFIG].update_from(load_accepted(launch.run_dir, launch.config_dir or None))
        except ConfigError as exc:
            log.error("config_reload_failed", error=str(exc))

    bus.on_config_reloaded = reload_config

    async def on_startup(_: web.Application) -> None:
        bus.start()

    async def on_cleanup(_: web.Application) -> None:
        await bus.close()

    cut: list[asyncio.TimerHandle] = []

    async def on_shutdown(_: web.Application) -> None:  # (a stop: listening is over, answers under way go on)
        if cut:  # (aiohttp's cleanup sends the signal again)
            return
        cut_s = drain_times(launch.shutdown_grace_s)[0]
        # requests still waiting for a model (to load, or for room) are answered now: the supervisor refuses them
        # at its own stop, but one killed with -9 answers nothing (their connections were cut with no answer)
        bus.control.fail_pending(503, "shutting_down", "llama-runner is shutting down: the model was not ready for "
                                 "this request")
        cut.append(asyncio.get_running_loop().call_later(
            cut_s, bus.fail_all, 503, "shutting_down",
            "llama-runner is shutting down: this request was cut short (limits.shutdown_grace_s)"))

    app.on_shutdown.append(on_shutdown)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def model_files(config: Config, kinds: tuple[str, ...] = ("llama",)) -> dict[str, tuple[Path, float, int]]:
    """name -> (path, mtime, size) of every configured model of ``kinds`` whose file (or folder) is there."""
    out: dict[str, tuple[Path, float, int]] = {}
    for name, model in config.models.models.items():
        if model.type not in kinds:
            continue
        path = config.model_path(model)
        with contextlib.suppress(OSError):
            st = path.stat()
            out[name] = (path, st.st_mtime, st.st_size)
    return out
