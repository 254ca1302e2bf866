"""Serve an aiohttp application on the launch's host and port until stopped (SIGTERM/SIGINT or the supervisor
gone). Shared by the gateways and the dashboard, and light on purpose: the dashboard imports this alone."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web

from bus.protocol import GatewayLaunch
from supervisor.child import install_stop_signals, watch_parent

log = structlog.get_logger()

KEEPALIVE_S = 75.0  # an idle kept-alive connection is closed after this long, on either path (aiohttp's run_app)


def make_runner(app: web.Application, shutdown_timeout: float = 60.0) -> web.AppRunner:
    """The app's runner: handlers cancelled when their client goes away, no access log, idle keep-alive
    connections closed after KEEPALIVE_S (aiohttp's own server default is an hour: idle connections piled up)."""
    return web.AppRunner(app, handler_cancellation=True, access_log=None, keepalive_timeout=KEEPALIVE_S,
                         shutdown_timeout=shutdown_timeout)


def drain_times(grace: float) -> tuple[float, float]:
    """At a stop, with ``grace`` seconds before the supervisor kills the process: how long answers under way
    may go on before they are cut short (with an error in their protocol's shape: the app's on_shutdown hook),
    and how long they are waited for in all (the error's time to go out)."""
    margin = min(0.5, grace / 4)
    return grace - 2 * margin, grace - margin


async def serve(app: web.Application, launch: GatewayLaunch) -> int:
    stop = asyncio.Event()
    install_stop_signals(stop.set)
    parent = asyncio.create_task(watch_parent(launch.supervisor_pid, stop.set))
    _, wait_s = drain_times(launch.shutdown_grace_s)
    runner = make_runner(app, wait_s)
    await runner.setup()
    fast = None
    try:
        if launch.protocol in ("ollama", "openai"):  # the gateways: their hot routes answered without aiohttp's web layer
            from gateway.fast_http import start_server

            assert runner.server is not None
            fast = await start_server(app, runner.server, launch.host, launch.port)
        if fast is None:
            await web.TCPSite(runner, launch.host, launch.port, reuse_address=True).start()
    except OSError as exc:
        from supervisor.processes import EXIT_CANNOT_LISTEN  # (it imports psutil: the dashboard needs none)

        log.error("bind_failed", host=launch.host, port=launch.port, error=str(exc))
        await runner.cleanup()
        return EXIT_CANNOT_LISTEN
    log.info("gateway_listening", protocol=launch.protocol, host=launch.host, port=launch.port)
    await stop.wait()
    parent.cancel()

    async def aiohttp_shutdown() -> None:
        with contextlib.suppress(Exception):
            await runner.shutdown()

    stops = [aiohttp_shutdown()]
    if fast is not None:
        from gateway.fast_http import shutdown

        stops.append(shutdown(*fast, timeout=wait_s))
    await asyncio.gather(*stops)  # answers under way finish, on either path
    await runner.cleanup()
    return 0
