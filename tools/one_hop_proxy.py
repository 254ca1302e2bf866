"""A plain one-hop aiohttp reverse proxy, for benchmarks: the calibration the design guide gives its figures against.

A benchmark tool only, never part of llama-runner. ``../shared/DESIGN.md`` measured "a plain one-hop aiohttp proxy
adds ~0.33 ms p50 per request; this two-hop ZeroMQ design ~0.66 ms done well" on its machines; this proxy, measured
in the same run as our gateways, says what such a proxy costs on the machine at hand (tools/bench).

``python tools/one_hop_proxy.py UPSTREAM_URL PORT``: every POST is sent to ``UPSTREAM_URL`` + its path with its body
(one kept-alive aiohttp client session), the answer relayed as it comes (status, Content-Type, each read written
as it arrives). uvloop where installed, as our processes. Prints ``listening on http://127.0.0.1:PORT`` when ready.
"""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
from aiohttp import web


async def serve(upstream: str, port: int) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=600))

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.content_type}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        async with session.post(upstream + request.path, data=body, headers=headers) as up:
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.content_type})
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app = web.Application()
    app.router.add_post("/{path:.*}", relay)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
        await runner.cleanup()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: one_hop_proxy.py UPSTREAM_URL PORT", file=sys.stderr)
        return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(argv[0].rstrip("/"), int(argv[1])))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    import signal

    # stopped by the benchmark at any point, a request under way or not: exit at once (sys.exit from the handler
    # raised inside aiohttp's callbacks and printed their tracebacks)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sys.exit(main(sys.argv[1:]))
