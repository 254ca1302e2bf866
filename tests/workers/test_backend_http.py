"""The worker's HTTP client to llama-server: framing (chunked split anywhere, Content-Length, until close),
keep-alive reuse, a stale kept-alive connection retried once, and stopping mid-answer closing the connection.

The server side here is a scripted raw socket (it sends exactly the bytes a test gives, in the pieces given);
the client's work against the real llama-server is covered end to end in tests/e2e and tests/gateway."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.pieces import split_at
from workers.backend_http import BackendHTTPError, BackendPool, _whole_chunks

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Backend:
    server: asyncio.Server
    port: int
    connections: list[int]  # one item per connection the client opened
    pool: BackendPool  # the client under test, pointed at the server


@contextlib.asynccontextmanager
async def serve(script: Script, unix_path: str | None = None) -> AsyncIterator[Backend]:
    """A scripted server (on ``unix_path`` if given, else on a TCP port) and a BackendPool to it, both closed at
    the end."""
    connections: list[int] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await script(r, w)
        finally:
            w.close()

    if unix_path:
        server = await asyncio.start_unix_server(handle, unix_path)
        port = 0
    else:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    b = Backend(server, port, connections, BackendPool("127.0.0.1", port, unix_path=unix_path))
    try:
        yield b
    finally:
        b.pool.close()
        server.close()


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await r.readexactly(length)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def fetch(pool: BackendPool, body: bytes = b"{}") -> tuple[list[tuple[int, str]], bytes]:
    heads: list[tuple[int, str]] = []
    data: list[bytes] = []
    await pool.request("POST", "/v1/chat/completions", body, lambda s, c: heads.append((s, c)) or True,
                       lambda d: data.append(d) or True)
    return heads, b"".join(data)


EVENTS = [b'data: {"choices":[{"delta":{"content":"' + w + b'"}}]}\n\n' for w in (b" the", b" quick", b" fox")]
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
           b"Keep-Alive: timeout=5, max=100\r\n\r\n" + chunked([*EVENTS, b"data: [DONE]\n\n"]))


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_chunked_answer_split_anywhere(cuts: list[int]) -> None:
    async def main() -> None:
        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_request(r)
            for piece in filter(None, split_at(CHUNKED, cuts)):
                w.write(piece)
                await w.drain()
                await asyncio.sleep(0)
            await r.read()  # keep the connection open until the client is done with it

        async with serve(script) as b:
            heads, data = await fetch(b.pool)
            assert heads == [(200, "text/event-stream")]
            assert data == b"".join([*EVENTS, b"data: [DONE]\n\n"])
            assert len(b.pool.idle) == 1  # the exchange ended cleanly: the connection is kept for the next one

    asyncio.run(main())


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix_socket"])
def test_content_length_keep_alive_reuses_one_connection(unix: bool, tmp_path) -> None:
    """Over TCP, and over the unix socket a worker's llama-server listens on beside its port."""
    unix_path = str(tmp_path / "b.sock") if unix else None

    async def main() -> None:
        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            for i in range(3):
                req = await read_request(r)
                assert req.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n") and req.endswith(b'{"n":%d}' % i)
                body = b'{"answer":%d}' % i
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body))
                await w.drain()
            await r.read()

        async with serve(script, unix_path) as b:
            for i in range(3):
                heads, data = await fetch(b.pool, b'{"n":%d}' % i)
                assert heads == [(200, "application/json")] and data == b'{"answer":%d}' % i
            assert len(b.connections) == 1

    asyncio.run(main())


def test_stale_keep_alive_connection_is_retried_once() -> None:
    async def main() -> None:
        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()
            # then close, as llama-server's HTTP library does after its keep-alive count or timeout

        async with serve(script) as b:
            assert (await fetch(b.pool))[1] == b"ok"
            await asyncio.sleep(0.05)  # the server's close arrives while the connection is idle... or not yet:
            assert (await fetch(b.pool))[1] == b"ok"  # either way the second request succeeds
            assert len(b.connections) == 2

    asyncio.run(main())


def test_close_delimited_body_and_errors() -> None:
    async def main() -> None:
        answers = iter([
            b"HTTP/1.0 500 Internal Server Error\r\nContent-Type: application/json\r\n\r\n{\"error\":\"boom\"}",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",  # then closes mid-chunk
            b"NOT HTTP\r\n\r\n",
        ])

        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_request(r)
            w.write(next(answers))
            await w.drain()

        async with serve(script) as b:
            heads, data = await fetch(b.pool)
            assert heads == [(500, "application/json")] and data == b'{"error":"boom"}'
            with pytest.raises(BackendHTTPError, match="in the middle"):
                await fetch(b.pool)
            with pytest.raises(BackendHTTPError, match="bad status line"):
                await fetch(b.pool)
        pool2 = BackendPool("127.0.0.1", b.port)
        await asyncio.sleep(0.05)
        with pytest.raises(BackendHTTPError, match="cannot connect"):
            await fetch(pool2)

    asyncio.run(main())


def test_stopping_mid_answer_closes_the_upstream_connection() -> None:
    async def main() -> None:
        closed = asyncio.Event()

        async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(10_000):  # an endless stream, as a long generation
                    w.write(b"5\r\nhello\r\n")
                    await w.drain()
                    await asyncio.sleep(0.001)
            except (ConnectionError, OSError):
                closed.set()  # the client closed: llama-server's write fails and it stops generating

        async with serve(script) as b:
            pool = b.pool
            got: list[bytes] = []
            await pool.request("POST", "/", b"{}", lambda s, c: True, lambda d: got.append(d) or len(got) < 3)
            assert len(got) == 3 and not pool.idle  # a half-read answer's connection is never reused
            await asyncio.wait_for(closed.wait(), 5)  # llama-server sees the close: it stops generating
            # a cancelled request also closes its connection
            task = asyncio.create_task(pool.request("POST", "/", b"{}", lambda s, c: True, lambda d: True))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not pool.idle and not pool.busy

    asyncio.run(main())


_payloads = st.lists(st.binary(max_size=40) | st.sampled_from([b"data: x\n\n", b"a\r\nb", b"\r\n", b"\r"]),
                     max_size=12)


@settings(max_examples=300, deadline=None)
@given(payloads=_payloads, cut=st.integers(min_value=0, max_value=2000))
def test_whole_chunks_takes_only_whole_chunks_from_the_start(payloads: list[bytes], cut: int) -> None:
    """Whatever a read holds (any chunks, the last one, cut anywhere), the fast path takes a prefix of whole
    non-empty chunks and their payloads exactly; the state machine is left the rest."""
    raw = chunked(payloads)
    buf = raw[:cut]
    got = _whole_chunks(buf)
    if got is None:
        return
    data, used = got
    assert used > 0 and raw[:used] == chunked_prefix(payloads, data)


def chunked_prefix(payloads: list[bytes], data: bytes) -> bytes:
    """The chunked encoding of the first payloads that make up ``data`` (all non-empty)."""
    out, taken = [], b""
    for p in payloads:
        if taken == data:
            break
        assert p, "the fast path took the last chunk"
        out.append(p)
        taken += p
    assert taken == data
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in out)


@pytest.mark.parametrize("tail", [b"0\r\n\r\n", b"0\r\n", b"", b"5\r\nab\r\nc\r\n0\r\n\r\n"])
def test_whole_chunks_reads_a_whole_short_answer_up_to_its_end(tail: bytes) -> None:
    """One read holding a whole short answer (what a busy server's streams mostly are): every plain chunk is taken
    at once, up to the last chunk (or a payload holding CR LF), which the state machine reads."""
    events = [*EVENTS, b"data: [DONE]\n\n"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in events)
    assert _whole_chunks(body + tail) == (b"".join(events), len(body))
