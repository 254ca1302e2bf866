"""Dashboard process: the web UI, its JSON API, a live SSE relay of the metrics bus, Prometheus ``/metrics``.

- ``/``: the Vue 3 + Element Plus page (ES modules with an import map, vendor files from ``web/node_modules``).
- ``/api/events``: SSE; a snapshot first (the hub is subscribed before the supervisor is asked for its
  status, so nothing is missed), then every bus event as it comes.
- ``/api/status``, ``/api/models``, ``/api/discover`` (POST adds what it found), ``/api/info``; actions ``POST /api/workers/{name}/{verb}``, ``POST
  /api/reload``; ``/api/logs/{name}`` (SSE tail); ``POST /api/chat`` (proxied to the OpenAI gateway).
- ``/metrics``: Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog
import zmq.asyncio
from aiohttp import web

from bus.control_client import ControlClient, ControlTimeout, new_id
from bus.protocol import (
    ErrorReply,
    GatewayLaunch,
    Reload,
    RestartWorker,
    StartWorker,
    Status,
    StatusReply,
    StopWorker,
)
from config.loader import Config, ConfigError, load_accepted, load_config
from config.schema import ModelConfig
from dashboard import auth, logtail
from dashboard.hub import Hub

log = structlog.get_logger()
CONTROL: web.AppKey[ControlClient] = web.AppKey("control", ControlClient)
LAUNCH: web.AppKey[GatewayLaunch] = web.AppKey("launch", GatewayLaunch)
HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
# The endless answers (the live event stream, log tails): ended at shutdown, or the process waits for them.
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams", set)


@contextlib.contextmanager
def _endless(request: web.Request) -> Iterator[None]:
    """Mark the running handler as an endless stream: the app's shutdown cancels it (the handler then ends
    its answer and returns)."""
    task = asyncio.current_task()
    streams = request.app[STREAMS]
    if task is not None:
        streams.add(task)
    try:
        yield
    finally:
        streams.discard(task)  # type: ignore[arg-type]
TOKEN: web.AppKey[str | None] = web.AppKey("token")
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)
PROM: web.AppKey[dict[str, Any]] = web.AppKey("prom")  # {"registry": ...} from the first scrape on

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
NODE_MODULES = HERE / "web" / "node_modules"
# The only files served from node_modules: URL name -> path inside node_modules.
VENDOR = {
    "vue.js": "vue/dist/vue.esm-browser.prod.js",
    "element-plus.js": "element-plus/dist/index.full.min.mjs",
    "element-plus.css": "element-plus/dist/index.css",
    "uplot.js": "uplot/dist/uPlot.esm.js",
    "uplot.css": "uplot/dist/uPlot.min.css",
}
STATIC_FILES = {"app.js", "style.css"}
MISSING_ASSETS = """<!doctype html><html><head><meta charset="utf-8"><title>llama-runner</title></head><body>
<h1>llama-runner dashboard</h1><p>The dashboard's browser files are not installed: run <code>make setup</code>
(it runs <code>npm ci</code> in <code>dashboard/web</code>). The JSON API works: <a href="/api/status">/api/status</a>,
<a href="/metrics">/metrics</a>.</p></body></html>"""


# --------------------------------------------------------------------------- pages and files
async def index(_: web.Request) -> web.StreamResponse:
    if not all((NODE_MODULES / p).is_file() for p in VENDOR.values()):
        return web.Response(text=MISSING_ASSETS, content_type="text/html", status=503)
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def no_favicon(_: web.Request) -> web.Response:
    return web.Response(status=204)


async def vendor(request: web.Request) -> web.StreamResponse:
    rel = VENDOR.get(request.match_info["file"])
    if rel is None or not (NODE_MODULES / rel).is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(NODE_MODULES / rel, headers={"Cache-Control": "max-age=86400"})


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})


# --------------------------------------------------------------------------- supervisor
async def _status(app: web.Application) -> StatusReply:
    reply = await app[CONTROL].request(Status(request_id=new_id()), 10)
    if not isinstance(reply, StatusReply):
        raise web.HTTPServiceUnavailable(text="no status from the supervisor")
    return reply


async def _ask(request: web.Request, cmd: Any, timeout: float = 60) -> web.Response:
    try:
        reply = await request.app[CONTROL].request(cmd, timeout)
    except ControlTimeout as exc:
        return web.json_response({"type": "error", "code": "timeout", "message": str(exc)}, status=503)
    status = reply.status if isinstance(reply, ErrorReply) else 200
    return web.Response(body=msgspec.json.encode(reply), status=status, content_type="application/json")


async def status(request: web.Request) -> web.Response:
    return await _ask(request, Status(request_id=new_id()), 10)


async def info(request: web.Request) -> web.Response:
    launch = request.app[LAUNCH]
    token = request.app[TOKEN]
    try:  # (the config the supervisor runs on: api_keys apply at a reload)
        keys = bool(load_accepted(launch.run_dir, launch.config_dir or None).app.proxies.lmstudio.api_keys)
    except ConfigError:
        keys = False
    return web.json_response({"token_required": token is not None, "token_ok": auth.check(request, token),
                              "api_key_required": keys, "host": launch.host, "port": launch.port})


async def action(request: web.Request) -> web.Response:
    name, verb = request.match_info["name"], request.match_info["verb"]
    kinds = {"start": StartWorker, "stop": StopWorker, "restart": RestartWorker, "unload": StopWorker}
    if verb not in kinds:
        return web.json_response({"type": "error", "code": "bad_request", "message": f"unknown action {verb!r}"},
                                 status=404)
    if verb == "unload":  # an unload leaves a busy model alone (stop is the forceful one): 409 from the supervisor
        return await _ask(request, StopWorker(request_id=new_id(), name=name, if_idle=True))
    return await _ask(request, kinds[verb](request_id=new_id(), name=name))


async def reload(request: web.Request) -> web.Response:
    return await _ask(request, Reload(request_id=new_id()))


# --------------------------------------------------------------------------- live
async def events(request: web.Request) -> web.StreamResponse:
    """SSE: a snapshot, then the bus (the listener is registered before the status is asked for); ended by the
    client, or at shutdown."""
    with _endless(request):
        return await _events(request)


async def _events(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    await hub.ready.wait()
    q = hub.listen()
    try:
        with contextlib.suppress(ControlTimeout, web.HTTPException):
            hub.apply_status(msgspec.to_builtins(await _status(request.app)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        await resp.write(b"data: " + msgspec.json.encode(hub.snapshot()) + b"\n\n")
        while True:
            try:
                first = await asyncio.wait_for(q.get(), 15)
            except TimeoutError:
                await resp.write(b": keepalive\n\n")
                continue
            batch = [first]
            while not q.empty() and len(batch) < 500:
                batch.append(q.get_nowait())
            await resp.write(b"".join(b"data: " + body + b"\n\n" for body in batch))
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.unlisten(q)
    return resp


async def logs(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    try:
        st = await _status(request.app)
    except ControlTimeout as exc:
        return web.json_response({"error": str(exc)}, status=503)
    if name not in {w.name for w in st.workers}:  # only names the supervisor knows become file names
        return web.json_response({"error": f"unknown model {name!r}"}, status=404)
    with _endless(request):
        return await logtail.tail(request, Path(request.app[LAUNCH].logs_dir), name)


async def metrics(request: web.Request) -> web.Response:
    # prometheus_client loads at the first scrape, not in every dashboard that is never scraped (~2 MB).
    from dashboard import prom

    made = request.app[PROM]
    if "registry" not in made:
        made["registry"] = prom.registry(request.app[HUB])
    body = prom.render(made["registry"])
    return web.Response(body=body, headers={"Content-Type": prom.CONTENT_TYPE})


# --------------------------------------------------------------------------- models and chat
def _config(request: web.Request) -> Config:
    """The config the supervisor runs on (the Models tab showed the files on disk: a model added there but not
    reloaded was offered, and a change not applied was shown as if it were); its ``config_dir`` is the user's
    (discovery writes there). A broken one is a 500 with the loader's message."""
    launch = request.app[LAUNCH]
    try:
        return load_accepted(launch.run_dir, launch.config_dir or None)
    except ConfigError as exc:
        raise web.HTTPInternalServerError(body=msgspec.json.encode({"error": f"config error: {exc}"}),
                                          content_type="application/json") from None


def _shown_parameters(m: ModelConfig) -> dict[str, Any]:
    """A model's settings as the models table shows them: a whisper model's own (no context; its threads,
    decoding settings), not the llama ones it ignores."""
    params = msgspec.to_builtins(m.parameters)
    if m.type != "whisper":
        return params  # type: ignore[no-any-return]
    w = m.whisper
    return {**params, "ctx_size": None, "threads": w.cpu_threads,
            "extra_args": [f"beam_size={w.beam_size}", f"compute_type={w.compute_type}", f"device={w.device}"]
            + ([f"language={w.language}"] if w.language else [])}


async def models(request: web.Request) -> web.Response:
    config = _config(request)
    loaded: dict[str, Any] = {}
    with contextlib.suppress(ControlTimeout, web.HTTPException):
        loaded = {w.name: w for w in (await _status(request.app)).workers}
    out = []
    for name, m in config.models.models.items():
        w = loaded.get(name)
        path = config.model_path(m)
        out.append({
            "name": name, "type": m.type, "mode": m.mode, "chat": m.serves_chat,
            "model_path": str(path), "exists": path.exists(), "size_bytes": config.model_size(m),
            "aliases": list(m.aliases), "parameters": _shown_parameters(m),
            "idle_ttl_s": m.idle_ttl_s if m.idle_ttl_s is not None else config.app.limits.idle_ttl_s,
            "default": name == config.models.default_model, "preload": any(config.resolve_model(p) == name for p in config.models.preload),
            "state": w.state.value if w else "unknown", "loaded": bool(w and w.state.value == "ready"),
            "pid": w.pid if w else 0,
        })
    return web.json_response({"models": out, "config_dir": str(config.config_dir)})


async def discover(request: web.Request) -> web.Response:
    """Model discovery under the models root: GET shows what is new, POST adds it to the config and reloads."""
    from config.loader import MODELS_FILE
    from supervisor.discovery import discover as run_discovery

    config = _config(request)
    write = request.method == "POST"
    root = config.models_root
    try:
        found = await asyncio.to_thread(run_discovery, config.config_dir / MODELS_FILE, root, write=write)
    except (OSError, ValueError) as exc:
        return web.json_response({"error": f"discovery failed: {exc}"}, status=500)
    doc: dict[str, Any] = {"models_root": str(root), "found": [
        {"name": f.name, "kind": f.kind, "path": f.path} for f in found]}
    if write and found:
        try:
            load_config(config.config_dir)
        except ConfigError as exc:
            return web.json_response({"error": f"the updated config does not load: {exc}"}, status=500)
        try:
            reply = await request.app[CONTROL].request(Reload(request_id=new_id()), 60)
            doc["reload"] = msgspec.to_builtins(reply)
        except ControlTimeout as exc:
            doc["reload"] = {"type": "error", "message": str(exc)}
    return web.json_response(doc)


def _gateway_base(st: StatusReply, launch: GatewayLaunch) -> str | None:
    proc = next((p for p in st.processes if p.name == "gateway-openai" and p.port), None)
    if proc is None:
        return None
    host = launch.host if launch.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{proc.port}"


BODY_TIMEOUT_S = 30.0


async def chat(request: web.Request) -> web.StreamResponse:
    """Try a model: a streamed chat completion through the OpenAI gateway, relayed as it comes (SSE)."""
    try:  # (a body that never comes held the connection for good)
        doc = msgspec.json.decode(await asyncio.wait_for(request.read(), BODY_TIMEOUT_S))
    except TimeoutError:
        return web.json_response({"error": f"the request body did not come within {BODY_TIMEOUT_S:.0f} s"},
                                 status=408)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return web.json_response({"error": "expected a JSON body"}, status=400)
    if not isinstance(doc, dict) or not isinstance(doc.get("model"), str) or not isinstance(doc.get("messages"),
                                                                                            list):
        return web.json_response({"error": "expected {model, messages}"}, status=400)
    max_tokens = doc.get("max_tokens") or 256
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 1_000_000:
        return web.json_response({"error": "max_tokens must be a positive integer"}, status=400)
    try:
        payload = msgspec.json.encode({"model": doc["model"], "messages": doc["messages"], "stream": True,
                                       "max_tokens": max_tokens})
    except (msgspec.EncodeError, RecursionError, OverflowError):
        return web.json_response({"error": "messages cannot be encoded"}, status=400)
    try:
        base = _gateway_base(await _status(request.app), request.app[LAUNCH])
    except ControlTimeout as exc:
        return web.json_response({"error": str(exc)}, status=503)
    if base is None:
        return web.json_response({"error": "the OpenAI gateway is not running"}, status=503)
    headers = {"Content-Type": "application/json"}
    # The OpenAI port's API key, if it wants one, is the caller's to give (the page's API key field, else
    # Authorization, else the dashboard's token): the chat sent the first configured key itself, which opened every
    # model to any local process.
    key = request.headers.get(auth.API_KEY_HEADER)
    given = (f"Bearer {key}" if key else request.headers.get("Authorization")
             or (f"Bearer {request.headers[auth.HEADER]}" if request.headers.get(auth.HEADER) else ""))
    if given:
        headers["Authorization"] = given
    try:
        async with request.app[HTTP].post(f"{base}/v1/chat/completions", data=payload, headers=headers) as up:
            if up.status >= 400:
                return web.Response(body=await up.read(), status=up.status, content_type="application/json")
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            return resp
    except aiohttp.ClientError as exc:
        return web.json_response({"error": f"gateway: {exc}"}, status=502)


# --------------------------------------------------------------------------- app
def _protected(request: web.Request) -> bool:
    """Actions, the log tail and the chat need the token (when one is required)."""
    path = request.path
    return request.method == "POST" or path.startswith("/api/logs/")


def build(launch: GatewayLaunch, token: str | None = None) -> web.Application:
    if token is None:
        configured = None
        with contextlib.suppress(ConfigError):
            configured = load_config(launch.config_dir or None).app.dashboard.token
        token = auth.dashboard_token(launch.host, configured)
        if token and not auth.is_loopback(launch.host) and not configured:
            log.warning("dashboard_token_generated")  # printed by `llama-runner up`, never logged
    app = web.Application(middlewares=[auth.guard(token, _protected, launch.host)])
    app[LAUNCH] = launch
    app[TOKEN] = token
    app[CONTROL] = ControlClient(launch.run_dir, zmq.asyncio.Context.instance())
    hub = app[HUB] = Hub(launch.run_dir)
    app[PROM] = {}
    app[STREAMS] = set()

    async def seed() -> None:  # the supervisor's view, for a scrape that comes before any browser
        with contextlib.suppress(Exception):
            await hub.ready.wait()
            hub.apply_status(msgspec.to_builtins(await _status(app)))

    tasks: set[asyncio.Task[None]] = set()

    async def on_startup(_: web.Application) -> None:
        hub.start()
        app[HTTP] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        tasks.add(asyncio.create_task(seed()))

    async def on_cleanup(_: web.Application) -> None:
        for t in tasks:
            t.cancel()
        await hub.stop()
        if HTTP in app:
            await app[HTTP].close()
        with contextlib.suppress(Exception):
            await app[CONTROL].close()

    async def on_shutdown(_: web.Application) -> None:  # (before aiohttp waits for the handlers under way)
        streams: set[asyncio.Task[Any]] = app[STREAMS]
        for t in list(streams):
            t.cancel()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    r = app.router
    r.add_get("/", index)
    r.add_get("/favicon.ico", no_favicon)
    r.add_get("/vendor/{file}", vendor)
    r.add_get("/static/{file}", static)
    r.add_get("/metrics", metrics)
    r.add_get("/api/info", info)
    r.add_get("/api/status", status)
    r.add_get("/api/models", models)
    r.add_get("/api/events", events)
    r.add_get("/api/logs/{name}", logs)
    r.add_post("/api/workers/{name}/{verb}", action)
    r.add_post("/api/reload", reload)
    r.add_post("/api/chat", chat)
    r.add_get("/api/discover", discover)
    r.add_post("/api/discover", discover)
    return app
