"""Who may act: control actions need the dashboard token when the dashboard listens beyond 127.0.0.1.

The token comes from the config (``dashboard.token``), else from ``LLAMA_RUNNER_DASHBOARD_TOKEN`` (set by
``llama-runner up``, which prints it), else one is made at start and logged. On loopback no token is needed,
but a state-changing request from a page of another origin is always refused (no cross-site actions).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from bus.endpoints import is_loopback

if TYPE_CHECKING:  # the supervisor imports this module for the token alone: no aiohttp in its process
    from aiohttp import web

    Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENV_TOKEN = "LLAMA_RUNNER_DASHBOARD_TOKEN"
HEADER = "X-Llama-Runner-Token"
API_KEY_HEADER = "X-Llama-Runner-Api-Key"  # the dashboard's chat: the OpenAI port's API key, apart from the token


def dashboard_token(host: str, configured: str | None, *, generate: bool = True) -> str | None:
    """The token actions need, or None when the dashboard is loopback-only and none is configured."""
    if configured:
        return configured
    env = os.environ.get(ENV_TOKEN)
    if env:
        return env
    if is_loopback(host) or not generate:
        return None
    import secrets  # (here, not at the top: with hmac it loads OpenSSL, ~3.4 MB the supervisor never needs)

    return secrets.token_urlsafe(18)


def presented(request: web.Request) -> str:
    """The dashboard token a request gives: its own header first (beside it, Authorization may carry an API key for
    the chat), else a bearer token, else ``?token=``."""
    own = request.headers.get(HEADER, "")
    if own:
        return own
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query.get("token", "")


def check(request: web.Request, token: str | None) -> bool:
    import hmac  # (the dashboard's process has it loaded already: aiohttp imports it)

    return token is None or hmac.compare_digest(presented(request).encode(), token.encode())


def same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


def guard(token: str | None, protected: Callable[[web.Request], bool],
          listen_host: str = "127.0.0.1") -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: on loopback, only this machine's names in Host (DNS rebinding: a page of another site would
    be "same origin"); ``protected(request)`` requests need the token; any non-GET needs the same origin."""
    from aiohttp import web

    from gateway.security import host_refusal

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        foreign = host_refusal(request, listen_host)
        if foreign is not None:
            return web.json_response({"error": foreign.message, "code": foreign.code}, status=403)
        if request.method not in ("GET", "HEAD", "OPTIONS") and not same_origin(request):
            return web.json_response({"error": "cross-origin request refused"}, status=403)
        if protected(request) and not check(request, token):
            return web.json_response({"error": "this action needs the dashboard token "
                                      "(printed by `llama-runner up`, or dashboard.token in app_config.json)",
                                      "code": "unauthorized"}, status=401)
        return await handler(request)

    return middleware
