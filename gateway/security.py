"""What stands between a client and the gateway's routes: API keys, CORS, and bounded request reading.

- API keys (``proxies.<gateway>.api_keys``): every request must send ``Authorization: Bearer <key>``, compared
  in constant time with each configured key; else 401 in the protocol's shape. Open without a key: CORS
  preflights (browsers never send credentials on them) and, on the Ollama port, ``GET /`` / ``HEAD /`` (the
  "Ollama is running" health check that load balancers and clients probe). Keys are never logged.
- CORS (``proxies.<gateway>.cors_origins``): off by default (no CORS headers at all); a listed origin, or any
  with ``"*"``, gets ``Access-Control-Allow-Origin`` on every answer and its preflight ``OPTIONS`` answered.
- Reading: the body must arrive within ``limits.read_timeout_s`` (408) and stay under
  ``limits.max_body_bytes`` (413). Routes read the whole body before asking for a worker, so a slow client
  never holds a worker slot.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hmac
import ipaddress
import socket
from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from bus.endpoints import is_loopback
from gateway.errors import ApiError

__all__ = ["add_cors_headers", "bearer_key", "host_refusal", "key_matches", "local_host_header", "preflight_answer",
           "read_body", "refusal"]

Getter = Callable[[web.Request], Sequence[str]]

CORS_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
CORS_MAX_AGE = "600"
READ_CHUNK = 256 * 1024


def bearer_key(request: web.Request) -> str:
    """The key a client sent (``Authorization: Bearer <key>``), or ``""``."""
    scheme, _, key = request.headers.get("Authorization", "").strip().partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Constant time per key, and every key is compared (the time does not say which one matched)."""
    raw = given.encode("utf-8", "surrogateescape")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(raw, key.encode())
    return ok and bool(raw)


LOCAL_SUFFIXES = (".localhost", ".local", ".internal")


@functools.cache
def _hostname() -> str:
    return socket.gethostname().lower()


@functools.lru_cache(maxsize=256)  # (per request on the hot path: a client sends the same Host every time)
def local_host_header(host: str) -> bool:
    """May a request naming ``host`` (its Host header) reach a server that listens on loopback? Its own names
    only: an IP literal that is local (loopback, private, unspecified, link-local), ``localhost``, this machine's
    name, ``*.localhost`` / ``*.local`` / ``*.internal`` (as Ollama's guard). A page of any other site whose name
    was made to resolve to 127.0.0.1 (DNS rebinding) names its own: refused."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:port
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("", "localhost", _hostname()) or host.endswith(LOCAL_SUFFIXES):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_unspecified or ip.is_link_local


def host_refusal(request: web.Request, listen_host: str) -> ApiError | None:
    """403 for a request to a loopback listener whose Host header is not a local name (see local_host_header)."""
    if not is_loopback(listen_host):
        return None
    host = request.headers.get("Host", "")
    if local_host_header(host):
        return None
    return ApiError(403, f"Host {host!r} is not this machine's: refused (llama-runner listens on {listen_host} "
                    "only; a web page under another name reaches it through DNS rebinding). Set `host` in "
                    "app_config.json to listen beyond loopback.", code="forbidden_host")


def is_preflight(request: web.Request) -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def refusal(request: web.Request, keys: Sequence[str], error: Callable[[web.Request, ApiError], web.Response],
            open_paths: frozenset[str] = frozenset()) -> web.Response | None:
    """401 (in the protocol's shape, via ``error``) unless the request carries one of ``keys``; None: let it in."""
    if (not keys or is_preflight(request)
            or (request.path in open_paths and request.method in ("GET", "HEAD"))
            or key_matches(bearer_key(request), keys)):
        return None
    given = bool(bearer_key(request))
    resp = error(request, ApiError(
        401, "invalid API key" if given else "missing API key: send the header `Authorization: Bearer "
        "<key>` with one of the keys configured for this port", code="invalid_api_key"))
    resp.headers["WWW-Authenticate"] = 'Bearer realm="llama-runner"'
    return resp


def _allowed(origin: str, origins: Sequence[str]) -> str | None:
    """The Access-Control-Allow-Origin for ``origin``: "*" if any origin is, the origin if it is listed or matches
    a listed pattern (``*`` for any characters, as Ollama's OLLAMA_ORIGINS: ``http://localhost:*``,
    ``chrome-extension://*``), else None."""
    if "*" in origins:
        return "*"
    if origin in origins or any("*" in o and fnmatch.fnmatchcase(origin, o) for o in origins):
        return origin
    return None


def preflight_answer(request: web.Request, origins: Sequence[str]) -> web.Response | None:
    """A preflight ``OPTIONS`` from an allowed origin is answered here (204), before routing and authentication;
    None otherwise (no origins configured: ``OPTIONS`` is routed as any method)."""
    origin = request.headers.get("Origin")
    allow = _allowed(origin, origins) if origins and origin else None
    if allow is None or not is_preflight(request):
        return None
    headers = {"Access-Control-Allow-Origin": allow, "Access-Control-Allow-Methods": CORS_METHODS,
               "Access-Control-Max-Age": CORS_MAX_AGE}
    wanted = request.headers.get("Access-Control-Request-Headers")
    if wanted:
        headers["Access-Control-Allow-Headers"] = wanted
    if allow != "*":
        headers["Vary"] = "Origin"
    return web.Response(status=204, headers=headers)


def add_cors_headers(request: web.Request, resp: web.StreamResponse, origins: Sequence[str]) -> None:
    """``Access-Control-Allow-Origin`` on every answer to an allowed origin, streams (NDJSON, SSE) included
    (called when a response is prepared: streams send their headers before their handler returns)."""
    if not origins:
        return
    origin = request.headers.get("Origin")
    allow = _allowed(origin, origins) if origin else None
    if allow is not None and "Access-Control-Allow-Origin" not in resp.headers:
        resp.headers["Access-Control-Allow-Origin"] = allow
        if allow != "*":
            resp.headers["Vary"] = "Origin"


async def read_body(request: web.Request, timeout: float, limit: int) -> bytes:
    """The whole body, within ``timeout`` seconds (408 after it) and at most ``limit`` bytes (413, refused
    from Content-Length before reading, else as soon as the running total passes it, chunked bodies too); a
    body that cannot be read as sent (a Content-Encoding it is not in, broken chunks) is a 400 (it was a 500)."""
    try:
        return await _read_body(request, timeout, limit)
    except (RequestPayloadError, HttpProcessingError) as exc:
        message = str(exc).split("message:", 1)[-1].strip() or "malformed"
        raise ApiError(400, f"the request body cannot be read: {message}", code="bad_body") from None


async def _read_body(request: web.Request, timeout: float, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    content = request.content
    if content.is_eof():  # the whole body is already here (a small request): no timer, no loop
        data = content.read_nowait(-1)
        if len(data) > limit:
            raise _too_large(limit)
        return data
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(READ_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise _too_large(limit)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g}s (limits.read_timeout_s)",
                       code="request_timeout") from None
    return bytes(buf)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body too large: the limit is {limit} bytes (limits.max_body_bytes)",
                    code="request_too_large")
