"""Dashboard process: a status page, a JSON status API, a live SSE relay of the metrics bus, and control actions.

(The full Vue UI is issue #6; this is the live core it builds on.)
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio
from aiohttp import web

from bus import endpoints
from bus.control_client import ControlClient, ControlTimeout, new_id
from bus.protocol import ErrorReply, GatewayLaunch, RestartWorker, StartWorker, Status, StopWorker

log = structlog.get_logger()
CONTROL: web.AppKey[ControlClient] = web.AppKey("control", ControlClient)
LAUNCH: web.AppKey[GatewayLaunch] = web.AppKey("launch", GatewayLaunch)

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>llama-runner</title>
<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;text-align:left}
.ready{color:green}.starting{color:orange}.backoff,.fatal{color:red}.stopped{color:gray}</style></head>
<body><h1>llama-runner</h1><table id="workers"><thead><tr><th>model</th><th>state</th><th>pid</th>
<th>restarts</th><th>rss MB</th><th>in flight</th><th></th></tr></thead><tbody></tbody></table>
<script>
const rows = {};
function row(name){ if(!rows[name]){ const tr=document.createElement('tr'); tr.id='w-'+name;
  tr.innerHTML='<td>'+name+'</td><td class=state></td><td class=pid></td><td class=restarts></td>'+
  '<td class=rss></td><td class=inflight></td><td><button>restart</button></td>';
  tr.querySelector('button').onclick=()=>fetch('/api/workers/'+encodeURIComponent(name)+'/restart',{method:'POST'});
  document.querySelector('#workers tbody').appendChild(tr); rows[name]=tr;} return rows[name]; }
function set(tr,cls,v){ tr.querySelector('.'+cls).textContent=v; }
function show(w){ const tr=row(w.name); const s=tr.querySelector('.state'); s.textContent=w.state; s.className='state '+w.state;
  set(tr,'pid',w.pid||'-'); if(w.restarts!==undefined) set(tr,'restarts',w.restarts); }
const es = new EventSource('/api/events');
es.onmessage = (m) => { const e = JSON.parse(m.data);
  if(e.type==='worker_state') show(e);
  if(e.type==='worker_metrics'){ const tr=row(e.name); set(tr,'rss',(e.rss_bytes/1e6).toFixed(0)); set(tr,'inflight',e.in_flight); show(e);} };
fetch('/api/status').then(r=>r.json()).then(s=>s.workers.forEach(show));
</script></body></html>"""


async def index(_: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def _ask(request: web.Request, cmd: Any) -> web.Response:
    try:
        reply = await request.app[CONTROL].request(cmd, 30)
    except ControlTimeout as exc:
        return web.json_response({"error": str(exc)}, status=503)
    status = reply.status if isinstance(reply, ErrorReply) else 200
    return web.Response(body=msgspec.json.encode(reply), status=status, content_type="application/json")


async def status(request: web.Request) -> web.Response:
    return await _ask(request, Status(request_id=new_id()))


async def action(request: web.Request) -> web.Response:
    name, verb = request.match_info["name"], request.match_info["verb"]
    kinds = {"start": StartWorker, "stop": StopWorker, "restart": RestartWorker}
    if verb not in kinds:
        return web.json_response({"error": f"unknown action {verb!r}"}, status=404)
    return await _ask(request, kinds[verb](request_id=new_id(), name=name))


async def events(request: web.Request) -> web.StreamResponse:
    """Relay the metrics bus to the browser as SSE (subscribe first; the page then asks for a snapshot)."""
    ctx = zmq.asyncio.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 1000
    sub.connect(endpoints.metrics(request.app[LAUNCH].run_dir))
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    try:
        while True:
            frames = await sub.recv_multipart()
            if len(frames) == 2:
                await resp.write(b"data: " + frames[1] + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        sub.close(0)
    return resp


def build(launch: GatewayLaunch) -> web.Application:
    app = web.Application()
    app[LAUNCH] = launch
    app[CONTROL] = ControlClient(launch.run_dir)

    async def on_cleanup(_: web.Application) -> None:
        with contextlib.suppress(Exception):
            await app[CONTROL].close()

    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/", index)
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/events", events)
    app.router.add_post("/api/workers/{name}/{verb}", action)
    return app
