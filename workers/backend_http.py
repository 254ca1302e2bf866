"""A minimal HTTP/1.1 client for the worker's own llama-server on loopback (keep-alive pool, asyncio Protocol).

Why not aiohttp's client: on these machines it cost ~0.4 ms of CPU per request (request object, payload
registry, header multidicts, stream reader, a task switch per read), about half of the worker's whole cost for a
tiny request. Here each read of the socket is decoded (chunked or Content-Length framing) in ``data_received`` and
handed to the caller's ``on_data`` right there: one call per read, carrying everything llama-server sent since the
last read, never one per token.

It speaks only to llama-server (or the benchmarks' synthetic upstream): responses are framed by Content-Length,
chunked transfer encoding, or the connection's close. A kept-alive connection the server closed meanwhile is
retried once on a new connection when nothing of the response arrived.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Callable
from itertools import repeat

MAX_HEAD = 64 * 1024
# Reads of one flowing answer closer than this: the next one waits this long (see _Conn._pace). uvloop's timers count
# whole milliseconds and round 0.5 ms down: there the wait is one loop turn (1 ms was measured: half the worker's CPU
# per token at 1 stream, but no more tokens/s, and fewer at 16 streams; BENCHMARKS.md).
GATHER_S = 0.0005

OnHead = Callable[[int, str], bool]  # (status, content type) -> keep going?
OnData = Callable[[bytes], bool]  # a read's body bytes -> keep going?


class BackendHTTPError(Exception):
    """The backend could not be reached, or broke the exchange (closed early, bad framing)."""


class _Stale(BackendHTTPError):
    """A kept-alive connection closed before any byte of the response: safe to send again on a new one."""


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class _Conn(asyncio.Protocol):
    def __init__(self, pool: BackendPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None  # (duck-typed: uvloop's are not subclasses)
        self.buf = b""  # bytes not yet consumed (an incomplete head, chunk size line or chunk)
        self.state = _DONE
        self.left = 0
        self.keep_alive = True
        self.got_bytes = False
        self.closed = False
        self.on_head: OnHead | None = None
        self.on_data: OnData | None = None
        self.done: asyncio.Future[None] | None = None
        self.flowing: Callable[[], bool] | None = None  # pacing starts once this says so (first token sent)
        self.on_end: Callable[[], None] | None = None  # called when the answer ended cleanly
        self.last_read = 0.0  # loop time of the last read that carried body data
        self.paused = False

    # --------------------------------------------------------------------- exchange
    def start(self, request: bytes, on_head: OnHead, on_data: OnData, flowing: Callable[[], bool] | None = None,
              on_end: Callable[[], None] | None = None) -> asyncio.Future[None]:
        assert self.transport is not None
        self.on_head, self.on_data, self.flowing, self.on_end = on_head, on_data, flowing, on_end
        self.state, self.left, self.keep_alive, self.got_bytes = _HEAD, 0, True, False
        self.last_read = 0.0
        self.buf = b""
        self.done = self.pool.loop.create_future()
        self.transport.write(request)
        return self.done

    def _finish(self, exc: BaseException | None = None, stopped: bool = False) -> None:
        done, self.done = self.done, None
        on_end = self.on_end
        self.on_head = self.on_data = self.flowing = self.on_end = None
        if exc is None and not stopped and on_end is not None:
            on_end()  # in this very callback: the end leaves with the last data, not a loop turn later
        self.state = _DONE
        if exc is not None or not self.keep_alive or self.buf:
            self.abort()
        else:
            self.pool._release(self)
        if done is not None and not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --------------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio classes

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.done is None:
            return
        if self.state == _UNTIL_CLOSE:
            self._finish()
        elif not self.got_bytes:
            self._finish(_Stale("llama-server closed the connection before answering"))
        else:
            self._finish(BackendHTTPError("llama-server closed the connection in the middle of its answer"))

    def data_received(self, data: bytes) -> None:
        if self.done is None:  # nothing asked: the server must not talk
            self.abort()
            return
        self.got_bytes = True
        self.buf = self.buf + data if self.buf else data
        try:
            if self.state == _HEAD and not self._head():
                return
            out = self._body()
        except BackendHTTPError as exc:
            self._finish(exc)
            return
        if out and self.on_data is not None and not self.on_data(out):
            self.keep_alive = False
            self._finish(stopped=True)
            return
        if self.state == _DONE:
            self._finish()
        elif out:
            self._pace()

    def _pace(self) -> None:
        """Body data arriving faster than one read per ``pool.gather_s``: wait that long before the next read, so
        that the kernel gathers what comes meanwhile into one read (and one bus message) instead of waking us for
        every token. A real model's tokens (milliseconds apart) are never held back; the first read of an answer
        never is, nor any before ``flowing()`` (the worker: until the first token went out)."""
        now = self.pool.loop.time()
        last, self.last_read = self.last_read, now
        gather = self.pool.gather_s
        if (gather and now - last < gather and self.transport is not None and not self.paused
                and (self.flowing is None or self.flowing())):
            self.paused = True
            self.transport.pause_reading()
            self.pool.loop.call_later(gather, self._resume)

    def _resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # --------------------------------------------------------------------- parsing
    def _head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise BackendHTTPError("llama-server's response head is too large")
            return False
        lines = self.buf[:end].split(b"\r\n")
        self.buf = self.buf[end + 4 :]
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise BackendHTTPError(f"llama-server sent a bad status line: {lines[0][:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        content_type = ""
        self.keep_alive = parts[0] == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit():
                    raise BackendHTTPError("llama-server sent a bad Content-Length")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"connection":
                self.keep_alive = value.lower() != b"close" and self.keep_alive
        if status in (100, 101):  # never asked for; llama-server does not send them
            raise BackendHTTPError(f"llama-server answered {status}")
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.state, self.left = (_LENGTH, length) if length else (_DONE, 0)
        elif status in (204, 304):
            self.state = _DONE
        else:
            self.state, self.keep_alive = _UNTIL_CLOSE, False
        if self.on_head is not None and not self.on_head(status, content_type):
            self.keep_alive = False
            self._finish(stopped=True)
            return False
        return True

    def _body(self) -> bytes:
        """Consume what the buffer holds of the body; returns the payload bytes of this read."""
        buf = self.buf
        state = self.state
        if state == _LENGTH:
            n = min(self.left, len(buf))
            out, self.buf = (buf, b"") if n == len(buf) else (buf[:n], buf[n:])
            self.left -= n
            if self.left == 0:
                self.state = _DONE
            return out
        if state == _UNTIL_CLOSE:
            self.buf = b""
            return buf
        if state not in (_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS):
            return b""
        pieces: list[bytes] = []
        pos = 0
        size = len(buf)
        find = buf.find
        tried = False
        while pos < size:
            if state == _CHUNK_SIZE:
                if not tried:  # once per read: the whole chunks in one go (after a chunk the last read split)
                    tried = True
                    whole = _whole_chunks(buf[pos:] if pos else buf)
                    if whole is not None:
                        pieces.append(whole[0])
                        pos += whole[1]
                if pos >= size:
                    break
                eol = find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > 1024:
                        raise BackendHTTPError("llama-server sent a bad chunk size line")
                    break
                try:
                    n = int(buf[pos:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise BackendHTTPError("llama-server sent a bad chunk size") from None
                pos = eol + 2
                if n:
                    self.left, state = n, _CHUNK_DATA
                else:
                    state = _TRAILERS
            elif state == _CHUNK_DATA:
                n = min(self.left, size - pos)
                pieces.append(buf[pos : pos + n])
                pos += n
                self.left -= n
                if self.left:
                    break
                state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if size - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise BackendHTTPError("llama-server sent a bad chunk ending")
                pos += 2
                state = _CHUNK_SIZE
            else:  # _TRAILERS: lines until an empty one
                eol = find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    state = _DONE
                    break
        self.buf = buf[pos:] if pos < size else b""
        self.state = state
        return b"".join(pieces) if len(pieces) != 1 else pieces[0]


def _whole_chunks(buf: bytes) -> tuple[bytes, int] | None:
    """The payload of the complete non-empty chunks at the start of ``buf`` and the bytes they take, or None.

    The fast path of a streamed answer: llama-server writes one SSE event per chunk and SSE data holds no CR LF,
    so splitting on CR LF gives size, payload, size, payload...; every size is checked against its payload's
    length in C-level loops (``map``), never a Python loop per token. The chunks up to the first that fails the
    check (a payload containing CR LF, the last chunk, extensions) are taken; from there the state machine reads.
    (A read often holds a whole short answer, its last chunk included.)"""
    parts = buf.split(b"\r\n")
    k = (len(parts) - 1) // 2  # (size, payload) pairs followed by the CR LF that ends the payload
    if k == 0:
        return None
    sizes, payloads = parts[0 : 2 * k : 2], parts[1 : 2 * k : 2]
    try:
        lengths = list(map(int, sizes, repeat(16)))
    except ValueError:
        return None
    fits = list(map(operator.eq, lengths, map(len, payloads)))
    if False in fits:
        k = fits.index(False)
    if 0 in lengths[:k]:  # the last chunk (it ends the answer: the state machine takes it)
        k = lengths.index(0)
    if k == 0:
        return None
    if k < len(sizes):
        payloads, sizes, lengths = payloads[:k], sizes[:k], lengths[:k]
    return b"".join(payloads), sum(map(len, sizes)) + sum(lengths) + 4 * k


class BackendPool:
    """Keep-alive connections to one host:port (or to the unix socket ``unix_path``, the Host header still naming
    host:port), reused last-in first-out."""

    def __init__(self, host: str, port: int, connect_timeout: float = 10.0, gather_s: float = GATHER_S,
                 unix_path: str | None = None, api_key: str = "") -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self.unix_path = unix_path
        self.gather_s = gather_s
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self.idle: list[_Conn] = []
        self.busy: set[_Conn] = set()

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.unix_path:
                    _, proto = await self.loop.create_unix_connection(lambda: _Conn(self), self.unix_path)
                else:
                    _, proto = await self.loop.create_connection(lambda: _Conn(self), self.host, self.port)
        except (OSError, TimeoutError) as exc:
            where = self.unix_path or f"{self.host}:{self.port}"
            raise BackendHTTPError(f"cannot connect to {where}: {exc}") from None
        return proto

    def _release(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        if not conn.closed:
            self.idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    async def request(self, method: str, path: str, body: bytes, on_head: OnHead, on_data: OnData,
                      flowing: Callable[[], bool] | None = None, on_end: Callable[[], None] | None = None) -> None:
        """Send one request; ``on_head`` then ``on_data`` (once per read), then ``on_end`` at a clean end, are called
        from the protocol. Returns at the end of the response (or when a callback said stop); raises
        BackendHTTPError."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.auth}"
                + (f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body or method == "POST"
                   else "")
                + "\r\n").encode("latin-1")
        request = head + body
        for attempt in (0, 1):
            fresh = not self.idle
            conn = self.idle.pop() if self.idle else await self._connect()
            self.busy.add(conn)
            try:
                await conn.start(request, on_head, on_data, flowing, on_end)
                return
            except _Stale:
                if fresh or attempt:
                    raise
            except BaseException:  # cancelled: the connection is mid-exchange, it cannot be reused
                conn.done = None
                conn.abort()
                self.busy.discard(conn)
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in [*self.idle, *self.busy]:
            conn.done = None
            conn.abort()
        self.idle.clear()
        self.busy.clear()
