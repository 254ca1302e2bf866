"""The hot routes' fast path (gateway/fast_http.py) on the real gateway apps, with the worker's side scripted.

A plain POST to a hot route is answered without aiohttp's web layer, with the same checks (API keys, CORS, error
shapes, request limits) and bytes; anything else hands the connection to aiohttp, which answers that request and
every later one as before (other routes, HEAD, ``Expect: 100-continue``, chunked bodies, HTTP/1.0,
query strings, malformed headers, oversize bodies). Requests sent back to back (pipelined) are answered in order;
a client gone mid-stream lets go of its job; ``Connection: close`` is honoured."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import fast_http, listen, ollama_app, openai_app
from gateway.server import BUS
from tests.gateway.test_security import KEY, build_app
from tests.gateway.test_stream_writes import CUT, STREAM, batches_of, scripted

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]}


class Served:
    def __init__(self, app: web.Application, port: int, fast: tuple[Any, set[fast_http.FastHTTP]]) -> None:
        self.app, self.port, self.fast = app, port, fast
        self.handed: list[int] = []
        self.logged: list[dict[str, Any]] = []

    async def exchange(self, raw: bytes, until_close: bool = False, answers: int = 1) -> bytes:
        """Send ``raw`` on a new connection; read ``answers`` whole answers (or until the server closes)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(raw)
            await writer.drain()
            if until_close:
                return await asyncio.wait_for(reader.read(), 10)
            return await asyncio.wait_for(read_answers(reader, answers), 10)
        finally:
            writer.close()


async def read_answers(reader: asyncio.StreamReader, n: int) -> bytes:
    out = b""
    for _ in range(n):
        head = await reader.readuntil(b"\r\n\r\n")
        out += head
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
        if b"content-length" in fields:
            out += await reader.readexactly(int(fields[b"content-length"]))
        elif fields.get(b"transfer-encoding") == b"chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                out += size_line + chunk
                if size == 0:
                    break
    return out


def body_of(answer: bytes) -> bytes:
    head, _, rest = answer.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    out = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        out, rest = out + rest[:size], rest[size + 2 :]
        if not size:
            break
    return out


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[tuple[web.AppRunner, Any]] = []

    async def make(protocol: str = "ollama", **app_config: Any) -> Served:
        app = build_app(tmp_path, protocol, **app_config)
        runner = listen.make_runner(app)  # (as the gateway's: the same keep-alive and cancellation)
        await runner.setup()
        assert runner.server is not None
        handed: list[int] = []
        aiohttp_server = runner.server

        def aiohttp_protocol() -> asyncio.Protocol:
            handed.append(1)
            return aiohttp_server()

        fast = await fast_http.start_server(app, aiohttp_protocol, "127.0.0.1", 0)
        assert fast is not None
        made.append((runner, fast))
        s = Served(app, fast[0].sockets[0].getsockname()[1], fast)
        s.handed = handed
        return s

    yield make
    for runner, (server, conns) in made:
        server.close()
        for c in list(conns):
            c.close()
        await runner.cleanup()


@pytest.fixture
async def served_once(served: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    """One Ollama gateway for every example of a test; valid requests get a scripted answer; log events kept."""
    s = await served("ollama")
    for module in (ollama_app, openai_app):
        monkeypatch.setattr(module, "open_fitting", scripted(batches_of(STREAM), []))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: s.logged.append({"event": "loop_error", **context}))
    try:
        with structlog.testing.capture_logs() as logged:
            s.logged = logged
            yield s
    finally:
        loop.set_exception_handler(None)


def post(path: str, doc: Any, extra: str = "", version: str = "1.1") -> bytes:
    body = json.dumps(doc).encode()
    return (f"POST {path} HTTP/{version}\r\nHost: localhost\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# --------------------------------------------------------------------------- answered on the fast path
@pytest.mark.parametrize("protocol,path", [("ollama", "/api/chat"), ("openai", "/v1/chat/completions")])
async def test_hot_routes_stream_on_the_fast_path_in_as_few_writes(served: Any, monkeypatch: pytest.MonkeyPatch,
                                                                   protocol: str, path: str) -> None:
    s = await served(protocol)
    app_module = ollama_app if protocol == "ollama" else openai_app
    model = json.loads(STREAM.split(b"\n\n")[0][6:])["model"]
    for pieces, writes_expected in (((STREAM,), 1), ((STREAM[:CUT], STREAM[CUT:]), 2)):
        writes: list[int] = []
        monkeypatch.setattr(app_module, "open_fitting", scripted(batches_of(*pieces), writes))
        answer = await s.exchange(post(path, {**CHAT, "model": model, "stream": True}))
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked" in answer
        body = body_of(answer)
        if protocol == "openai":
            assert body == STREAM and b"text/event-stream" in answer
        else:
            lines = [json.loads(x) for x in body.splitlines()]
            assert lines[-1]["done"] and not lines[0]["done"] and b"application/x-ndjson" in answer
        assert len(writes) == writes_expected
    assert not s.handed  # type: ignore[attr-defined]


async def test_errors_keys_and_cors_on_the_fast_path(served: Any) -> None:
    s = await served("ollama", **{"proxies.ollama.api_keys": [KEY], "proxies.ollama.cors_origins": ["http://ui"]})
    # no key: 401 in Ollama's shape, CORS header for the allowed origin
    answer = await s.exchange(post("/api/chat", CHAT, "Origin: http://ui\r\n"))
    assert answer.startswith(b"HTTP/1.1 401 ") and b"Access-Control-Allow-Origin: http://ui" in answer
    assert b"WWW-Authenticate: Bearer" in answer and "missing API key" in json.loads(body_of(answer))["error"]
    # the key, bad JSON: 400 in Ollama's shape; on /v1 of the Ollama port: OpenAI's shape
    auth = f"Authorization: Bearer {KEY}\r\n"
    raw = post("/api/chat", CHAT, auth).replace(b'{"model"', b'{"model" oops', 1)
    raw = raw.replace(b"Content-Length: %d" % len(json.dumps(CHAT)), b"Content-Length: %d" % (len(json.dumps(CHAT)) + 5))
    answer = await s.exchange(raw)
    assert answer.startswith(b"HTTP/1.1 400 ") and "invalid JSON" in json.loads(body_of(answer))["error"]
    answer = await s.exchange(post("/v1/chat/completions", {"messages": []}, auth))
    assert answer.startswith(b"HTTP/1.1 400 ") and isinstance(json.loads(body_of(answer))["error"], dict)
    answer = await s.exchange(post("/api/chat", {"messages": []}, auth))
    assert answer.startswith(b"HTTP/1.1 400 ") and json.loads(body_of(answer)) == {
        "error": "model is required (llama-runner)"}
    assert not s.handed  # type: ignore[attr-defined]
    assert s.app[BUS] is not None


async def test_pipelined_requests_are_answered_in_order_and_connection_close_is_honoured(
        served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await served("openai")
    model = json.loads(STREAM.split(b"\n\n")[0][6:])["model"]
    monkeypatch.setattr(openai_app, "open_fitting", scripted(batches_of(STREAM), []))
    one = post("/v1/chat/completions", {**CHAT, "model": model, "stream": True})
    bad = post("/v1/chat/completions", {"messages": []})
    answer = await s.exchange(one + bad + one, answers=3)
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and answer.index(b"HTTP/1.1 400 ") > answer.index(b"200 OK")
    answer = await s.exchange(post("/v1/chat/completions", {"messages": []}, "Connection: close\r\n"),
                              until_close=True)
    assert answer.startswith(b"HTTP/1.1 400 ")  # and the server closed: read() returned
    assert not s.handed  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- handed to aiohttp
@pytest.mark.parametrize("raw,status,then", [
    (b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n", 200, True),
    (b"HEAD / HTTP/1.1\r\nHost: localhost\r\n\r\n", 200, True),
    (post("/api/chat", {"messages": []}, "Expect: 100-continue\r\n"), 100, False),
    (b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 400, True),
    (post("/api/chat?x=1", {"messages": []}), 400, True),
    (post("/api/chat", {"messages": []}, version="1.0"), 400, False),  # (aiohttp closes an HTTP/1.0 exchange)
    (post("/api/chat", {"messages": []}, "Bad Header\r\n"), 400, False),  # (and a malformed one)
    (post("/api/chat", {"messages": []}).replace(b"Content-Length: 16", b"Content-Length: 99999999"), 413, False),
    # a length in digits that are not ASCII ("²".isdigit() is True): aiohttp's 400, not a dropped connection
    (post("/api/chat", {"messages": []}).replace(b"Content-Length: 16", "Content-Length: ²".encode("latin-1")),
     400, False),
    # lines ended by a bare LF: aiohttp's 400 at once, not a wait for a CRLF head until the keep-alive timeout
    (post("/api/chat", {"messages": []}).replace(b"\r\n", b"\n"), 400, False),
    # no HTTP at all (a TLS hello: https:// to a plain port): at once, not after the keep-alive timeout (75 s)
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, False),
    # two Host headers (the host check read the first), none, a control character, a head over 8 KiB: aiohttp's
    (post("/api/chat", {"messages": []}, "Host: evil.example\r\n"), 400, False),
    (post("/api/chat", {"messages": []}).replace(b"Host: localhost\r\n", b""), 400, False),
    (post("/api/chat", {"messages": []}, "X-A: a\x00b\r\n"), 400, False),
    (post("/api/chat", {"messages": []}, "X-A: " + "a" * 9000 + "\r\n"), 400, False),
])
async def test_anything_else_is_answered_by_aiohttp_then_and_after(served: Any, raw: bytes, status: int,
                                                                   then: bool) -> None:
    s = await served("ollama")
    version = b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer = await s.exchange(raw + version, answers=2) if then else await s.exchange(raw, answers=1)
    assert answer.startswith(b"HTTP/1.1 %d " % status) or answer.startswith(b"HTTP/1.0 %d " % status), answer[:200]
    if then:
        assert answer.count(b"HTTP/1.") == 2 and b'"version"' in answer  # the next request too, by aiohttp
    assert s.handed == [1]  # type: ignore[attr-defined]


async def test_a_compressed_body_is_read_by_aiohttp(served: Any) -> None:
    """aiohttp decodes a Content-Encoding; the fast path reads bodies as they come, so it hands such a one over."""
    s = await served("ollama")
    body = gzip.compress(json.dumps({"messages": []}).encode())
    raw = (b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body)) + body
    answer = await s.exchange(raw)
    assert answer.startswith(b"HTTP/1.1 400 ") and "model is required" in json.loads(body_of(answer))["error"]
    assert s.handed == [1]  # type: ignore[attr-defined]


async def test_an_idle_connection_is_closed_after_an_aiohttp_answer_too(served: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """(aiohttp's own server keeps an idle connection for an hour: a client could pile them up.)"""
    monkeypatch.setattr(listen, "KEEPALIVE_S", 0.3)
    s = await served("ollama")
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    try:
        writer.write(b"GET /api/version HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await asyncio.wait_for(read_answers(reader, 1), 10)).startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server once idle
    finally:
        writer.close()


async def send_in_two(s: Served, raw: bytes, cut: int, pause: float) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    try:
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(pause)
        writer.write(raw[cut:])
        return await asyncio.wait_for(read_answers(reader, 1), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("where", ["after the head", "in the body"])
async def test_a_small_body_following_its_head_is_awaited_on_the_fast_path(served: Any, where: str) -> None:
    """httpx (the openai and ollama clients) and http.client write a request's head and body apart."""
    s = await served("ollama")
    raw = post("/api/chat", {"messages": []})
    cut = raw.index(b"\r\n\r\n") + 4 if where == "after the head" else len(raw) - 5
    answer = await send_in_two(s, raw, cut, 0.05)
    assert answer.startswith(b"HTTP/1.1 400 ") and "model is required" in json.loads(body_of(answer))["error"]
    assert s.handed == []  # type: ignore[attr-defined]


async def test_a_body_too_slow_or_too_large_to_wait_for_is_read_by_aiohttp(served: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_http, "BODY_WAIT_S", 0.05)
    s = await served("ollama")
    raw = post("/api/chat", {"messages": []})
    answer = await send_in_two(s, raw, len(raw) - 5, 0.3)  # the rest comes after BODY_WAIT_S
    assert answer.startswith(b"HTTP/1.1 400 ") and "model is required" in json.loads(body_of(answer))["error"]
    assert s.handed == [1]  # type: ignore[attr-defined]

    monkeypatch.setattr(fast_http, "BODY_WAIT_S", 10.0)
    monkeypatch.setattr(fast_http, "BODY_WAIT_MAX", 8)  # a body larger than that is not awaited here
    answer = await send_in_two(s, raw, len(raw) - 5, 0.05)
    assert answer.startswith(b"HTTP/1.1 400 ") and "model is required" in json.loads(body_of(answer))["error"]
    assert s.handed == [1, 1]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- a client gone
async def test_a_client_gone_mid_stream_lets_go_of_its_job(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await served("openai")
    model = json.loads(STREAM.split(b"\n\n")[0][6:])["model"]
    closed: list[str] = []
    real = scripted([batches_of(STREAM[:CUT], STREAM[CUT:])[0]], [])  # the head and some data, never the end

    async def open_job(request: Any, *args: Any, **kwargs: Any) -> Any:
        relay = await real(request, *args, **kwargs)
        close = relay.close

        async def tracked_close() -> None:
            closed.append(relay.ch.request_id)
            await close()

        relay.close = tracked_close
        return relay

    monkeypatch.setattr(openai_app, "open_fitting", open_job)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(post("/v1/chat/completions", {**CHAT, "model": model, "stream": True}))
    await asyncio.wait_for(reader.readuntil(b"data: "), 10)  # streaming
    writer.close()
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.02)
    assert closed == ["r1"]


async def test_requests_sent_far_ahead_of_their_turn_pause_reading(served: Any) -> None:
    s = await served("ollama")

    class Transport:
        paused = 0

        def pause_reading(self) -> None:
            self.paused += 1

        def resume_reading(self) -> None:
            self.paused -= 1

    conn = fast_http.FastHTTP(s.app, {}, lambda: asyncio.Protocol(), set())
    conn.transport = Transport()  # type: ignore[assignment]
    conn.task = asyncio.get_running_loop().create_future()  # type: ignore[assignment]  # (an answer under way)
    conn.data_received(b"x" * 1000)
    assert conn.transport.paused == 0  # type: ignore[union-attr]
    conn.data_received(b"x" * fast_http.PIPELINE_MAX)  # (not a body's worth: 32 MiB held a connection)
    assert conn.transport.paused == 1  # type: ignore[union-attr]
    conn.task.cancel()  # type: ignore[union-attr]


_methods = st.sampled_from(["POST", "GET", "post", "PUT", "HEAD", "OPTIONS"])
_paths = st.sampled_from(["/api/chat", "/api/generate", "/v1/chat/completions", "/v1/completions", "/api/chat?x=1",
                          "/api/chat/", "/nope", "*", "http://x/api/chat"])
_versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 extra", "", "http/1.1"])
_header = st.one_of(
    st.tuples(st.sampled_from(["Content-Type", "Expect", "Transfer-Encoding", "Connection", "Origin", "Upgrade",
                               "Authorization", "X-Odd", " Content-Length", "Content-Length "]),
              st.sampled_from(["application/json", "100-continue", "chunked", "close", "keep-alive", "http://ui",
                               "websocket", "Bearer x", "", " spaced "])),
    st.tuples(st.just("Content-Length"), st.sampled_from(["0", "5", "-1", "abc", "99999999999", " 3", "1e3"])),
    st.tuples(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8),
              st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=12)),
)
_bodies = st.one_of(st.just(b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}]}'),
                    st.just(b'{"model":"smollm2","messages":[{"role":"user","content":"hi"}],"stream":false}'),
                    st.just(b"{}"), st.just(b"[1,2]"), st.binary(max_size=40))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=_methods, path=_paths, version=_versions, headers=st.lists(_header, max_size=5), body=_bodies,
       with_length=st.booleans(), then_more=st.booleans())
async def test_any_request_is_answered_or_refused_and_the_server_goes_on(
        served_once: Served, method: str, path: str, version: str, headers: list[tuple[str, str]], body: bytes,
        with_length: bool, then_more: bool) -> None:
    """Whatever the request line, headers and body: an answer, a close, or (a body shorter than its length) a
    wait for the rest; never an error of the fast path itself, and the next client is answered."""
    s = served_once
    head = f"{method} {path} {version}\r\nHost: localhost\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    if with_length:
        head += f"Content-Length: {len(body)}\r\n"
    raw = head.encode("latin-1") + b"\r\n" + body
    if then_more:
        raw += post("/api/chat", {"messages": []})
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(raw)
    with contextlib.suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(reader.read(65536), 0.5)
    writer.close()
    answer = await s.exchange(post("/api/chat", {"messages": []}))
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert not [e for e in s.logged if e.get("event") in ("fast_path_failed", "loop_error")]


async def test_a_stop_lets_the_answer_under_way_finish_and_closes_idle_connections(
        served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = await served("openai")
    model = json.loads(STREAM.split(b"\n\n")[0][6:])["model"]
    head_and_half, rest = batches_of(STREAM[:CUT], STREAM[CUT:])  # the second half and the end: held back
    channels: list[Any] = []
    first = scripted([head_and_half], [])

    async def open_job(request: Any, *args: Any, **kwargs: Any) -> Any:
        relay = await first(request, *args, **kwargs)
        channels.append(relay.ch)
        return relay

    monkeypatch.setattr(openai_app, "open_fitting", open_job)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", s.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
    writer.write(post("/v1/chat/completions", {**CHAT, "model": model, "stream": True}))
    await asyncio.wait_for(reader.readuntil(b"data: "), 10)  # streaming
    stopping = asyncio.create_task(fast_http.shutdown(*s.fast, timeout=10))
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # an idle connection: closed at once
    await asyncio.sleep(0.1)
    assert not stopping.done()  # the stream under way holds the stop
    for item in rest:
        channels[0].push(item)
    answer = await asyncio.wait_for(reader.read(), 10)  # the rest of it, then the close
    assert answer.endswith(b"0\r\n\r\n") and b"[DONE]" in answer
    await asyncio.wait_for(stopping, 5)
    writer.close()
    idle_writer.close()
