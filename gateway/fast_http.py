"""The hot routes without aiohttp's web layer: a plain HTTP/1.1 protocol in front of the gateway's aiohttp app.

Why (issue 7, measured in BENCHMARKS.md): aiohttp's request and response machinery (request objects, a task per
request, router, middleware partials, header multidicts, signals, its writer) was 150-200 µs of CPU of a gateway's
600-650 µs for a tiny request; on these 2-core machines a request's added latency is mostly the CPU spent on its way.

What takes the fast path: ``POST`` to a hot route (``/api/chat``, ``/api/generate``, ``/v1/chat/completions``,
``/v1/completions``, as the app routes them) over HTTP/1.1, framed by Content-Length and within
``limits.max_body_bytes``, no ``Expect`` / ``Transfer-Encoding`` / ``Upgrade`` / ``Content-Encoding``, its body
read whole (one that follows its head, as httpx and http.client send it, is awaited if small: ``BODY_WAIT_MAX``,
``BODY_WAIT_S``). Such a request runs the app's own route handler and checks (``ANSWER``: counted, API key, errors
in the protocol's shape; ``ON_PREPARE``: CORS, open streams), with a small stand-in for aiohttp's request
(``FastRequest``) and a streamed answer of its own (``FastStream``, chunked). At the first request that is anything
else, the connection is handed to aiohttp for good: its own protocol takes the transport and every byte not yet
answered, as if it had been there from the start.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate
from typing import Any, cast

import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.listen import KEEPALIVE_S
from gateway.server import ANSWER, CONFIG, ON_PREPARE, Handler

log = structlog.get_logger()

HOT_PATHS = ("/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions")
BODY_WAIT_MAX = 256 * 1024  # a body up to this size that follows its head is awaited here (larger: aiohttp reads it)
BODY_WAIT_S = 1.0  # ... for this long; a body still incomplete then is read by aiohttp (as a slow client's)
PIPELINE_MAX = 64 * 1024  # bytes read ahead of the request being answered (aiohttp's own pause is near it)
MAX_HEAD = 8 * 1024  # (aiohttp's line limit: a longer head is its to refuse)
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # (in a header: aiohttp's 400)
REFUSED_HEADERS = frozenset({"content-encoding", "expect", "transfer-encoding", "upgrade"})  # (aiohttp's to read)


def hot_routes(app: web.Application) -> dict[bytes, Handler]:
    """The app's own handlers of the hot paths it routes for POST (none for an app without them)."""
    out: dict[bytes, Handler] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path")
        if route.method == "POST" and path in HOT_PATHS:
            out[path.encode()] = route.handler  # type: ignore[assignment]
    return out


class _Body:
    """The request body, whole (what ``security.read_body`` asks of aiohttp's stream reader)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def is_eof(self) -> bool:
        return True

    def read_nowait(self, n: int = -1) -> bytes:
        data, self.data = self.data, b""
        return data


class FastRequest(dict[Any, Any]):
    """What the hot routes and the gateway's checks use of ``web.Request``: ``app``, ``method``, ``path``,
    ``headers``, ``content_length``, ``content``, ``transport``, and the request's own storage (a dict)."""

    def __init__(self, conn: FastHTTP, method: str, path: str, headers: CIMultiDict[str], body: bytes) -> None:
        super().__init__()
        self.conn = conn
        self.app = conn.app
        self.method = method
        self.path = path
        self.headers = headers
        self.content_length = len(body)
        self.content = _Body(body)
        self.stream: FastStream | None = None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.conn.transport

    async def open_stream(self, headers: Mapping[str, str]) -> FastStream:
        """A streamed answer (what ``relay.open_stream`` gives a route on the fast path)."""
        self.stream = FastStream(self, headers)
        await self.app[ON_PREPARE](cast(web.Request, self), cast(web.StreamResponse, self.stream))
        return self.stream


def _head(status: int, reason: str, headers: Mapping[str, str], framing: bytes) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}\r\n"]
    lines.extend(f"{k}: {v}\r\n" for k, v in headers.items())
    lines.append(f"Date: {_date()}\r\n")
    return "".join(lines).encode("latin-1") + framing


_date_cache = (0, "")


def _date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class FastStream:
    """A streamed answer (chunked transfer encoding): its head leaves with its first bytes, its last bytes with its
    end (the same writes as ``relay.StreamAnswer``)."""

    status = 200
    reason = "OK"

    def __init__(self, request: FastRequest, headers: Mapping[str, str]) -> None:
        self.request = request
        self.headers: CIMultiDict[str] = CIMultiDict(headers)
        self._head_sent = False
        self.ended = False

    def _framed(self, data: bytes) -> list[bytes]:
        out = [] if self._head_sent else [_head(200, "OK", self.headers, b"Transfer-Encoding: chunked\r\n\r\n")]
        self._head_sent = True
        if data:
            out += [b"%x\r\n" % len(data), data, b"\r\n"]
        return out

    async def write(self, data: bytes) -> None:
        if data or not self._head_sent:
            await self.request.conn.send(self._framed(data))

    async def write_eof(self, data: bytes = b"") -> None:
        if not self.ended:
            self.ended = True
            await self.request.conn.send([*self._framed(data), b"0\r\n\r\n"])


# A request head the fast path takes: its route's handler, path, headers, where its body starts, and its length.
_Head = tuple[Handler, str, CIMultiDict[str], int, int]


class FastHTTP(asyncio.Protocol):
    """One client connection (see the module's docstring); ``aiohttp_protocol()`` makes aiohttp's own."""

    def __init__(self, app: web.Application, routes: dict[bytes, Handler],
                 aiohttp_protocol: Callable[[], asyncio.Protocol], connections: set[FastHTTP]) -> None:
        self.app = app
        self.routes = routes
        self.aiohttp_protocol = aiohttp_protocol
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self.closing = False  # the client asked to close after this answer
        self.handed_over = False
        self._paused = False
        self._reading_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._waiting: _Head | None = None  # a request's head, parsed, its body not all here yet
        self._body_wait: asyncio.TimerHandle | None = None  # ... and how long it is awaited

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's transports are not asyncio classes)
        self.connections.add(self)
        self._idle = self.loop.call_later(KEEPALIVE_S, self.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None
        self._stop_timers()
        if self.task is not None:
            self.task.cancel()  # the client went away: the route lets go of its job (as aiohttp's cancellation)
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if self.task is None:
            self._next()
        elif len(self.buf) > PIPELINE_MAX and self.transport is not None:
            # requests sent ahead of their turn: no more until this answer is out (at a body's worth, a client
            # writing junk behind a stream held 32 MiB a connection, and copied it at every read)
            self.transport.pause_reading()
            self._reading_paused = True

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # ------------------------------------------------------------------ requests
    def _next(self) -> None:
        """Answer the next whole request in the buffer here, or hand the connection to aiohttp."""
        head = self._waiting or self._head()
        if head is None:
            return
        handler, path, headers, start, length = head
        if len(self.buf) < start + length:
            # Clients such as httpx (openai, ollama) and http.client write the head and the body apart: a small
            # body is awaited here (a while, its head kept parsed); a large one is read by aiohttp, as is a body
            # still missing by then.
            if length > BODY_WAIT_MAX:
                return self._hand_over()
            if self._waiting is None:
                self._waiting = head
                self._body_wait = self.loop.call_later(BODY_WAIT_S, self._hand_over)
            return
        if self._waiting is not None:
            self._stop_timers()
        body, self.buf = self.buf[start : start + length], self.buf[start + length :]
        request = FastRequest(self, "POST", path, headers, body)
        self.task = self.loop.create_task(self._answer(request, handler))

    def _head(self) -> _Head | None:
        """The next request's head if the fast path takes it; None: not all here yet, or handed to aiohttp."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD:
            # (too long, lines ended by a bare LF, or no HTTP at all, e.g. a TLS hello: aiohttp's 400 at once; it
            # waited for a head that never came, 75 s)
            if len(buf) > MAX_HEAD or b"\n\n" in buf or not buf[:1].isalpha():
                self._hand_over()
            return None
        self._stop_timers()
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        handler = self.routes.get(parts[1].encode("latin-1")) if len(parts) == 3 else None
        if handler is None or parts[0] != "POST" or parts[2] != "HTTP/1.1":
            self._hand_over()
            return None
        headers: CIMultiDict[str] = CIMultiDict()
        length = -1
        hosts = 0
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            name = name.lower()
            if not sep or not name or name != name.strip() or name in REFUSED_HEADERS or _CONTROL.search(line):
                self._hand_over()  # (a malformed or an unusual request: aiohttp answers it)
                return None
            value = value.strip()
            if name == "host":
                hosts += 1
            elif name == "content-length":
                if length >= 0 or not (value.isascii() and value.isdigit()):  # ("²".isdigit() is True)
                    self._hand_over()
                    return None
                length = int(value)
            elif name == "connection" and value.lower() == "close":
                self.closing = True
            headers.add(name, value)
        if length < 0 or length > self.app[CONFIG].app.limits.max_body_bytes or hosts != 1:
            self._hand_over()  # (no length, too large, no Host or two: aiohttp answers it)
            return None
        return handler, parts[1], headers, end + 4, length

    async def _answer(self, request: FastRequest, handler: Handler) -> None:
        try:
            resp = await self.app[ANSWER](cast(web.Request, request), handler)
            if request.stream is None:
                await self._send_response(request, cast(web.Response, resp))
            elif not request.stream.ended:  # (a route that returned without ending its stream)
                await request.stream.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.close()
            return
        except Exception:  # (the answer's checks caught the route's errors: this is ours)
            log.exception("fast_path_failed", path=request.path)
            self.close()
            return
        finally:
            self.task = None
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
        if self.closing:
            self.close()
        elif self.transport is not None:
            self._idle = self.loop.call_later(KEEPALIVE_S, self.close)
            if self.buf:
                self._next()

    async def _send_response(self, request: FastRequest, resp: web.Response) -> None:
        await self.app[ON_PREPARE](cast(web.Request, request), resp)
        body = resp.body if isinstance(resp.body, bytes) else b""
        headers = {k: v for k, v in resp.headers.items() if k.lower() != "content-length"}
        await self.send([_head(resp.status, resp.reason, headers, b"Content-Length: %d\r\n\r\n" % len(body)), body])

    async def send(self, pieces: list[bytes]) -> None:
        """Write ``pieces`` (one system call); wait while the client reads slower than we write."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.writelines(pieces)
        while self._paused and self.transport is not None:
            self._drained = self.loop.create_future()
            await self._drained

    def _stop_timers(self) -> None:
        """No keep-alive timeout, no body awaited (a request's head arrived, the answer started, or it is over)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._body_wait is not None:
            self._body_wait.cancel()
            self._body_wait = None
        self._waiting = None

    def _hand_over(self) -> None:
        """aiohttp answers this connection from here on: the request not answered yet, and everything after it."""
        transport = self.transport
        self.handed_over = True
        self.connections.discard(self)
        self._stop_timers()
        if transport is None:
            return
        protocol = self.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        rest, self.buf = self.buf, b""
        if rest:
            protocol.data_received(rest)

    def close(self) -> None:
        if self.transport is not None and not self.handed_over:
            self.transport.close()


SHUTDOWN_S = 60.0  # answers under way at a stop get this long to finish (aiohttp's own shutdown timeout)


async def shutdown(server: asyncio.Server, connections: set[FastHTTP], timeout: float = SHUTDOWN_S) -> None:
    """Stop listening; close idle connections now and the others once their answer under way is out (a stream in
    flight finishes, as aiohttp lets its handlers finish), within ``timeout``."""
    server.close()
    for conn in list(connections):
        conn.closing = True  # no next request on it
        if conn.task is None:
            conn.close()
    under_way = [conn.task for conn in connections if conn.task is not None]
    if under_way:
        await asyncio.wait(under_way, timeout=timeout)
    for conn in list(connections):
        conn.close()


async def start_server(app: web.Application, aiohttp_protocol: Callable[[], asyncio.Protocol], host: str,
                       port: int) -> tuple[asyncio.Server, set[FastHTTP]] | None:
    """Listen with the fast path in front of aiohttp (None: the app has no hot routes; aiohttp listens alone)."""
    routes = hot_routes(app)
    if not routes:
        return None
    connections: set[FastHTTP] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: FastHTTP(app, routes, aiohttp_protocol, connections), host, port, reuse_address=True, backlog=128)
    return server, connections
