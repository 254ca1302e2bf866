"""The load client: aiohttp on one event loop, bounded and time-limited loops, loopback only.

The targets speak to the same backend process: ``direct`` (llama-server's /v1/chat/completions SSE on its TCP
port), ``ollama`` (the gateway's /api/chat NDJSON) and ``openai`` (the gateway's /v1/chat/completions SSE); and,
as a reference, ``direct-unix`` (llama-server over the unix socket the worker speaks to it on).
Tokens are counted in the client: one per streamed line carrying a non-empty ``"content":"..."``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec

TOKEN = b'"content":"'
EMPTY = b'"content":""'
JSON = {"Content-Type": "application/json"}
# The default model (SmolLM2) writes on to any max_tokens for this prompt at temperature 0 (512 tested): every stream
# of the real model carries the tokens asked for. (It answered "count to one thousand" with 6 tokens and stopped, so
# the real model's streams were a few tokens long and its tokens/s mostly per-request overhead.)
PROMPT = [{"role": "user", "content": "Write a long story about a fox who lives in a forest."}]


class LoadError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    model: str
    session: aiohttp.ClientSession | None = field(default=None, compare=False)  # its own (e.g. over a unix socket)
    key: str = ""  # llama-server's API key (a worker's llama-server wants the one its worker gave it)
    # the request headers, made once (not on every measured request)
    headers: dict[str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", {**JSON, "Authorization": f"Bearer {self.key}"} if self.key else JSON)

    def body(self, tokens: int, stream: bool) -> bytes:
        if self.name == "ollama":
            doc: dict[str, object] = {
                "model": self.model,
                "messages": PROMPT,
                "stream": stream,
                "options": {"num_predict": tokens, "temperature": 0, "seed": 1},
            }
        else:
            doc = {
                "model": self.model,
                "messages": PROMPT,
                "stream": stream,
                "max_tokens": tokens,
                "temperature": 0,
                "seed": 1,
            }
        return msgspec.json.encode(doc)


def targets(direct_port: int, ollama_port: int, openai_port: int, model: str, key: str = "") -> dict[str, Target]:
    return {
        "direct": Target("direct", f"http://127.0.0.1:{direct_port}/v1/chat/completions", model, key=key),
        "ollama": Target("ollama", f"http://127.0.0.1:{ollama_port}/api/chat", model),
        "openai": Target("openai", f"http://127.0.0.1:{openai_port}/v1/chat/completions", model),
    }


def session(unix_path: str | None = None) -> aiohttp.ClientSession:
    connector = (aiohttp.UnixConnector(path=unix_path, limit=0, limit_per_host=0) if unix_path
                 else aiohttp.TCPConnector(limit=0, limit_per_host=0))
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600))


@dataclass
class StreamResult:
    ttft: float  # seconds from sending the request to the first token line (nan: no token)
    tokens: int
    elapsed: float


# A kept-alive connection the server closed meanwhile (llama-server's HTTP library caps requests per connection):
# the request is sent again once, on a new connection.
_STALE = (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


async def stream_once(s: aiohttp.ClientSession, t: Target, body: bytes) -> StreamResult:
    try:
        return await _stream_once(s, t, body)
    except _STALE:
        return await _stream_once(s, t, body)


async def _stream_once(s: aiohttp.ClientSession, t: Target, body: bytes) -> StreamResult:
    t0 = time.perf_counter()
    ttft = float("nan")
    tokens = 0
    rest = b""
    async with (t.session or s).post(t.url, data=body, headers=t.headers) as resp:
        if resp.status != 200:
            raise LoadError(f"{t.name}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for data in resp.content.iter_any():
            buf = rest + data if rest else data
            cut = buf.rfind(b"\n") + 1
            rest = buf[cut:]
            if cut:
                done = buf[:cut] if rest else buf
                n = done.count(TOKEN) - done.count(EMPTY)
                if n and tokens == 0:
                    ttft = time.perf_counter() - t0
                tokens += n
    return StreamResult(ttft, tokens, time.perf_counter() - t0)


async def request_once(s: aiohttp.ClientSession, t: Target, body: bytes) -> float:
    try:
        return await _request_once(s, t, body)
    except _STALE:
        return await _request_once(s, t, body)


async def _request_once(s: aiohttp.ClientSession, t: Target, body: bytes) -> float:
    t0 = time.perf_counter()
    async with (t.session or s).post(t.url, data=body, headers=t.headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise LoadError(f"{t.name}: HTTP {resp.status}: {raw[:300]!r}")
    return time.perf_counter() - t0


@dataclass
class Throughput:
    tokens: int
    streams: int
    wall: float
    errors: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0


async def stream_throughput(
    s: aiohttp.ClientSession,
    t: Target,
    concurrency: int,
    tokens: int,
    duration: float,
    max_streams: int = 100000,
) -> Throughput:
    """``concurrency`` loops each streaming ``tokens``-token answers back to back until ``duration`` is over
    (every loop streams at least once). Tokens/s = tokens of finished streams / time to the last finish."""
    body = t.body(tokens, True)
    total = [0, 0, 0]  # tokens, streams, errors
    started = [0]
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def loop() -> None:
        first = True
        while (first or time.perf_counter() < deadline) and started[0] < max_streams:
            first = False
            started[0] += 1
            try:
                r = await stream_once(s, t, body)
            except (LoadError, aiohttp.ClientError):
                total[2] += 1
                if total[2] > 20:
                    raise
                continue
            total[0] += r.tokens
            total[1] += 1

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return Throughput(total[0], total[1], time.perf_counter() - t0, total[2])


async def requests_per_s(
    s: aiohttp.ClientSession, t: Target, concurrency: int, duration: float, tokens: int = 1
) -> tuple[float, int, int]:
    """Tiny non-streaming requests from ``concurrency`` loops for ``duration``: (requests/s, done, errors)."""
    body = t.body(tokens, False)
    done = [0, 0]
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def loop() -> None:
        while time.perf_counter() < deadline:
            try:
                await request_once(s, t, body)
                done[0] += 1
            except (LoadError, aiohttp.ClientError):
                done[1] += 1
                if done[1] > 20:
                    raise

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done[0] / (time.perf_counter() - t0), done[0], done[1]


async def latencies(
    s: aiohttp.ClientSession, ts: list[Target], samples: int, tokens: int, stream: bool
) -> dict[str, list[float]]:
    """Sequential requests, the targets interleaved (d, o, a, d, o, a, ...) so that drift hits all alike.
    Non-streaming: whole-request latency; streaming: time to first token."""
    out: dict[str, list[float]] = {t.name: [] for t in ts}
    bodies = {t.name: t.body(tokens, stream) for t in ts}
    for _ in range(samples):
        for t in ts:
            if stream:
                r = await stream_once(s, t, bodies[t.name])
                if r.tokens:
                    out[t.name].append(r.ttft)
            else:
                out[t.name].append(await request_once(s, t, bodies[t.name]))
    return out


async def latencies_back_to_back(
    s: aiohttp.ClientSession, ts: list[Target], samples: int, block: int = 20
) -> dict[str, list[float]]:
    """Tiny non-streaming requests in blocks of ``block`` to one target, the targets in turn (d x20, o x20, a x20,
    ...: drift still hits all alike): each path as a client sending one request after another sees it. The first
    request of a block (its processes idle while the other paths ran) is left out."""
    out: dict[str, list[float]] = {t.name: [] for t in ts}
    bodies = {t.name: t.body(1, False) for t in ts}
    block = max(1, min(block, samples))
    for _ in range(max(1, samples // block)):
        for t in ts:
            for i in range(block + 1):
                took = await request_once(s, t, bodies[t.name])
                if i:
                    out[t.name].append(took)
    return out


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]
