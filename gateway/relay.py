"""Reading one job's answer from its channel: the backend's head, then its body in batches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import msgspec
from aiohttp import web

from bus.protocol import Data, End, Fail, Head
from gateway.bus_client import Channel, GatewayBus
from gateway.errors import ApiError, ContextOverflow, log_failure


def _fail_error(item: Fail) -> ApiError:
    return ApiError(item.status, item.message, code=item.code, param=item.param or None, source=item.source)


class StreamAnswer(web.StreamResponse):
    """A streamed answer whose head leaves with its first bytes, in one write (aiohttp's StreamResponse sends it
    alone at ``prepare``), as llama-server and Ollama do. With ``write_eof(last)`` for the last bytes, a short
    answer read at once is one write, not four (head, body, end of body... each a syscall and a client wakeup)."""

    _send_headers_immediately = False  # (aiohttp's own switch: its Response class sets it so)


async def open_stream(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    """A started streamed answer for ``request``: aiohttp's (a StreamAnswer), or the fast path's own
    (gateway/fast_http.py). Either takes ``write(bytes)`` and ``write_eof(last bytes)``."""
    opener = getattr(request, "open_stream", None)  # (a FastRequest)
    if opener is not None:
        return cast(web.StreamResponse, await opener(headers))
    resp = StreamAnswer(headers=headers)
    await resp.prepare(request)
    return resp


class Relay:
    def __init__(self, bus: GatewayBus, ch: Channel, timeout: float) -> None:
        self.bus, self.ch, self.timeout = bus, ch, timeout
        self._pending: list[bytes] = []
        self._ended = False
        self._fail: ApiError | None = None
        self.load_ns = 0  # time to get a READY worker (includes a cold start)

    async def head(self) -> Head:
        while True:
            items = await self.ch.batch(self.timeout)
            for i, item in enumerate(items):
                if isinstance(item, Head):
                    self._absorb(items[i + 1:])
                    return item
                if isinstance(item, Fail):
                    self.ch.finished = True
                    raise _fail_error(item)

    def _absorb(self, items: Sequence[object]) -> None:
        for item in items:
            if isinstance(item, Data):
                self._pending.append(item.data)
            elif isinstance(item, End):
                self._ended = True
                self.ch.finished = True
            elif isinstance(item, Fail):
                self._ended = True
                self.ch.finished = True
                self._fail = _fail_error(item)

    async def stream_to(self, resp: web.StreamResponse, convert: Callable[[bytes], bytes],
                        on_error: Callable[[ApiError], bytes], final: Callable[[], bytes] = bytes) -> None:
        """Write the answer to ``resp``, each piece ``convert``-ed; its last bytes (and ``final()``) leave with the end
        of the body, in one write; an error in the middle ends it with ``on_error(err)``."""
        last = b""
        try:
            async for chunk in self.chunks():
                out = convert(chunk)
                if self._ended_cleanly:  # the answer's end came with this piece
                    last = out
                elif out:
                    await resp.write(out)
            last += final()
        except ApiError as err:
            log_failure(err, model=self.ch.worker, mid_stream=True)
            last += on_error(err)
        await resp.write_eof(last)

    @property
    def _ended_cleanly(self) -> bool:
        """All of the answer is here and it ended without a failure."""
        return self._ended and self._fail is None

    @property
    def worker(self) -> str:
        return self.ch.worker

    async def chunks(self) -> AsyncIterator[bytes]:
        """Everything the backend sent since the last wakeup, joined: one piece per wakeup."""
        while True:
            if self._pending:
                data, self._pending = b"".join(self._pending), []
                yield data
            if self._fail is not None:
                raise self._fail
            if self._ended:
                return
            self._absorb(await self.ch.batch(self.timeout))

    async def body(self) -> bytes:
        if self._ended_cleanly:  # (a small answer came whole, with its head: no generator)
            data, self._pending = b"".join(self._pending), []
            return data
        return b"".join([c async for c in self.chunks()])

    async def close(self) -> None:
        await self.bus.close_channel(self.ch)


def backend_error(status: int, body: bytes) -> ApiError:
    """An error answer of llama-server, as an ApiError marked as coming from the backend."""
    message = body.decode(errors="replace").strip() or f"HTTP {status}"
    try:
        doc = msgspec.json.decode(body)
        err = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
            if err.get("type") == "exceed_context_size_error":
                return ContextOverflow(status, message, _count(err.get("n_prompt_tokens")), _count(err.get("n_ctx")))
        elif isinstance(err, str):
            message = err
    except msgspec.DecodeError:
        pass
    return ApiError(status, message, code="backend_error", source="backend")


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
