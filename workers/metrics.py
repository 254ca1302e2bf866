"""A worker's request figures: per-request events and the counters behind its WorkerMetrics.

Hot path: ``data()`` runs once per backend read (not per token) and does only byte counting in C
(``bytes.count`` of the ``"content":"`` each streamed piece carries) — no JSON parsing. The exact token count
of a request is read once, at its end, from the ``timings``/``usage`` llama-server puts in its last chunk.
Events go out on a non-blocking PUB (dropped, never awaited, when nobody reads).
"""

from __future__ import annotations

import collections
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from bus import endpoints
from bus.codec import encode_event
from bus.protocol import RequestEvent

_PREDICTED = b'"predicted_n":'  # llama-server's timings: the tokens it generated
_COMPLETION = b'"completion_tokens":'  # OpenAI's usage: the same
_CONTENT = b'"content":"'  # one per generated piece in chat (and llama-server /completion) streams
_TEXT = b'"text":"'  # the same in /v1/completions streams
_DELTA = b'"type":"response.output_text.delta"'  # the same in /v1/responses streams
_OUTPUT = b'"output_tokens":'  # the Responses API's usage: the tokens generated
_TAIL_KEEP = 2048  # the end of a response kept for its timings/usage (amortised: trimmed past _TAIL_MAX)
_TAIL_MAX = 8192


def _last_count(tail: bytearray, key: bytes) -> int | None:
    """The number after the last ``key`` in ``tail`` (a search from the end in C, not a regex over the tail)."""
    at = tail.rfind(key)
    if at < 0:
        return None
    digits = tail[at + len(key) : at + len(key) + 24].lstrip(b" ")
    end = len(digits) - len(digits.lstrip(b"0123456789"))
    return int(digits[:end]) if end else None


class Times(Protocol):
    """What a worker keeps of a request's course (each kind of worker its own record)."""

    path: str
    stream: bool
    arrived: float
    started: float
    first: float
    route: str
    gateway: str


@dataclass
class _Live:
    path: str
    stream: bool
    arrived: float
    route: str = ""
    gateway: str = ""
    started: float = 0.0
    first: float = 0.0
    marker: bytes = _CONTENT
    tail: bytearray = field(default_factory=bytearray)  # the last bytes, where llama-server puts timings/usage
    counted: int = 0  # tokens already added to the worker's total for this request


@dataclass
class RequestFigures:
    """What every kind of worker keeps of its requests: TTFTs, tokens, rates, and its RequestEvent publisher."""

    name: str
    pub: zmq.Socket | None = None  # a sync view of the worker's PUB socket (None: no events, e.g. tests)
    wanted: bool = True  # does anybody subscribe to this model's request events? (the worker keeps it current)
    tokens_total: int = 0
    ttfts: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=100))
    ttft_last: float = 0.0

    def __post_init__(self) -> None:
        self.live: dict[str, Any]  # each kind's requests under way, by id (with their .route and .gateway)
        self.topic = endpoints.topic_request(self.name)
        self._last_tokens = 0
        self._last_requests = 0
        self._last_tick = time.monotonic()

    def rates(self, requests_total: int) -> tuple[float, float]:
        """(tokens/s, requests/s) since the previous call."""
        now = time.monotonic()
        dt = max(1e-3, now - self._last_tick)
        tps = max(0, self.tokens_total - self._last_tokens) / dt
        rps = max(0, requests_total - self._last_requests) / dt
        self._last_tick, self._last_tokens, self._last_requests = now, self.tokens_total, requests_total
        return tps, rps

    def ttft_p50(self) -> float:
        return statistics.median(self.ttfts) if self.ttfts else 0.0

    def _emit_finished(self, rid: str, st: Times, tokens: int, status: int, outcome: str) -> None:
        now = time.monotonic()
        self._emit(rid, "finished", path=st.path, stream=st.stream, queued_s=(st.started or now) - st.arrived,
                   ttft_s=(st.first - st.arrived) if st.first else 0.0, tokens=tokens, duration_s=now - st.arrived,
                   status=status, outcome=outcome, route=st.route, gateway=st.gateway)

    def _emit(self, rid: str, phase: str, **fields: Any) -> None:
        """Publish a RequestEvent, built only while somebody subscribes to this model's request events."""
        if self.pub is None or not self.wanted:
            return
        if "route" not in fields:  # (every phase says where the request came in: only queued and finished did)
            st = self.live.get(rid)
            if st is not None:
                fields["route"], fields["gateway"] = st.route, st.gateway
        event = RequestEvent(request_id=rid, model=self.name, phase=phase, **fields)
        try:
            self.pub.send_multipart(encode_event(self.topic, event), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass


@dataclass
class WorkerStats(RequestFigures):
    live: dict[str, _Live] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)  # request ids waiting for a slot, in order

    # ------------------------------------------------------------------ per request
    def queued(self, rid: str, path: str, stream: bool, route: str = "", gateway: str = "",
               rejected: bool = False) -> None:
        """A request arrived; it waits for a slot (``rejected``: the queue is full, it only gets its "finished")."""
        end = path.rstrip("/")
        marker = _TEXT if end.endswith("/v1/completions") else _DELTA if end.endswith("/v1/responses") else _CONTENT
        self.live[rid] = _Live(path, stream, time.monotonic(), route, gateway, marker=marker)
        if rejected:
            return
        self.waiting.append(rid)
        self._emit(rid, "queued", path=path, stream=stream, position=len(self.waiting), route=route,
                   gateway=gateway)

    def _leave_queue(self, rid: str) -> None:
        """``rid`` left the queue (got a slot, was rejected or cancelled): those behind it move up."""
        try:
            i = self.waiting.index(rid)
        except ValueError:
            return
        del self.waiting[i]
        for pos, other in enumerate(self.waiting[i:], start=i + 1):
            self._emit(other, "position", position=pos)

    def started(self, rid: str) -> None:
        self._leave_queue(rid)
        st = self.live.get(rid)
        if st is None:
            return
        st.started = time.monotonic()
        self._emit(rid, "started", path=st.path, stream=st.stream, queued_s=st.started - st.arrived)

    def data(self, rid: str, chunk: bytes) -> bool:
        """One backend read (hot path: byte counts only). True once the answer flows: a stream's first token went
        out, or a non-streaming answer began. Only streamed tokens have a time to first token (a non-streaming
        answer, an error or an embedding has none: counted as one, its whole time skewed the TTFT figures)."""
        st = self.live.get(rid)
        if st is None:
            return False
        st.tail += chunk
        if len(st.tail) > _TAIL_MAX:
            del st.tail[:-_TAIL_KEEP]
        if not st.stream:
            return True
        n = chunk.count(st.marker)
        self.tokens_total += n
        st.counted += n
        if n and not st.first:
            st.first = time.monotonic()
            ttft = st.first - st.arrived
            self.ttft_last = ttft
            self.ttfts.append(ttft)
            self._emit(rid, "first_token", path=st.path, stream=st.stream, ttft_s=ttft,
                       queued_s=(st.started or st.first) - st.arrived)
        return bool(st.first)

    def finished(self, rid: str, status: int, outcome: str) -> None:
        st = self.live.pop(rid, None)
        if st is None:  # (finished already)
            return
        if not st.started:  # it never left the queue
            self._leave_queue(rid)
        exact = _last_count(st.tail, _PREDICTED)
        if exact is None:
            exact = _last_count(st.tail, _COMPLETION)
        if exact is None:
            exact = _last_count(st.tail, _OUTPUT)
        tokens = st.counted if exact is None else exact
        self.tokens_total += max(0, tokens - st.counted)  # a counter: the exact figure only adds
        self._emit_finished(rid, st, tokens, status, outcome)
