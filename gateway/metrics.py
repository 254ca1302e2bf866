"""A gateway's figures on the metrics bus: requests, errors, open streams (one GatewayMetrics a second).

``GatewayStats`` counts (``begin``/``end`` from the gateway's middleware, ``prepared`` when a response starts);
``install(app, stats)`` starts the publisher with the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import psutil
import structlog
import zmq
import zmq.asyncio
from aiohttp import web

from bus import endpoints
from bus.codec import encode_event
from bus.protocol import GatewayLaunch, GatewayMetrics

log = structlog.get_logger()

_STREAMING = web.RequestKey("llama_runner_streaming", bool)


class GatewayStats:
    def __init__(self, launch: GatewayLaunch) -> None:
        self.launch = launch
        self.requests_total = 0
        self.errors_total = 0
        self.client_errors_total = 0
        self.in_flight = 0
        self.open_streams = 0
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._last = (time.monotonic(), 0)

    # ------------------------------------------------------------------ counting
    def begin(self) -> None:
        """A request arrived (called by the gateway's middleware, outermost: it sees every answer)."""
        self.requests_total += 1
        self.in_flight += 1

    def end(self, request: web.Request, status: int) -> None:
        """It was answered with ``status`` (0: the client went away)."""
        self.in_flight -= 1
        if request.get(_STREAMING):
            self.open_streams -= 1
        if status >= 500:
            self.errors_total += 1
        elif status >= 400:
            self.client_errors_total += 1

    def prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        """A response that is not a plain ``web.Response`` streams (SSE, NDJSON): count it open."""
        if not isinstance(response, web.Response) and not request.get(_STREAMING):
            request[_STREAMING] = True
            self.open_streams += 1

    # ------------------------------------------------------------------ publishing
    def snapshot(self, me: psutil.Process | None = None) -> GatewayMetrics:
        now = time.monotonic()
        t0, n0 = self._last
        rps = max(0, self.requests_total - n0) / max(1e-3, now - t0)
        self._last = (now, self.requests_total)
        cpu, rss = 0.0, 0
        if me is not None:
            with contextlib.suppress(psutil.Error):
                cpu, rss = me.cpu_percent(), me.memory_info().rss
        return GatewayMetrics(
            name=f"gateway-{self.launch.protocol}", protocol=self.launch.protocol, pid=os.getpid(),
            port=self.launch.port, requests_total=self.requests_total, requests_per_s=rps,
            errors_total=self.errors_total, client_errors_total=self.client_errors_total,
            in_flight=self.in_flight, open_streams=self.open_streams, cpu_percent=cpu, rss_bytes=rss,
            uptime_s=now - self.started)

    async def publish_forever(self, interval: float = 1.0) -> None:
        ctx = zmq.asyncio.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.sndhwm = 100
        pub.connect(endpoints.metrics_in(self.launch.run_dir))
        topic = endpoints.topic_gateway_metrics(self.launch.protocol)
        me = psutil.Process()
        try:
            while True:
                with contextlib.suppress(zmq.ZMQError):
                    await pub.send_multipart(encode_event(topic, self.snapshot(me)), zmq.NOBLOCK)
                await asyncio.sleep(interval)
        finally:
            pub.close(0)

    async def start(self, _: web.Application) -> None:
        self._task = asyncio.create_task(self.publish_forever())

    async def stop(self, _: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


STATS: web.AppKey[GatewayStats] = web.AppKey("gateway_stats", GatewayStats)


def install(app: web.Application, stats: GatewayStats) -> GatewayStats:
    """Publish ``app``'s GatewayMetrics every second while it runs (the gateway's middleware counts)."""
    app[STATS] = stats
    app.on_startup.append(stats.start)
    app.on_cleanup.append(stats.stop)
    return stats
