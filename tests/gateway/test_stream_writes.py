"""Streamed answers leave in as few writes as their batches allow (gateway/relay.py's StreamAnswer): the head with the
first bytes, the last bytes with the end of the body. A short answer that reached the gateway at once is one write
(each write is a syscall here and a wakeup of the client); the bytes are the same as ever.

The real Ollama and OpenAI gateway apps, with the worker's side scripted: ``open_job`` hands the route a relay whose
channel holds a recorded llama-server stream, in one batch or two."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bus.protocol import Data, End, Head, StreamItem
from gateway import ollama_app, openai_app
from gateway.bus_client import Channel
from gateway.relay import Relay
from tests.gateway.test_security import Factory, gateway  # noqa: F401  (the real apps, no supervisor)

STREAM = (Path(__file__).parent / "golden" / "chat_stream.txt").read_bytes()
CUT = STREAM.index(b"\n\n", len(STREAM) // 2) + 2  # two batches: the stream's first half, then the rest


class _Bus:
    async def close_channel(self, ch: Channel) -> None:
        ch.close()


def scripted(batches: list[list[StreamItem]], writes: list[int]) -> Any:
    """An ``open_job`` whose worker answers ``batches`` (the first at once, each next one a loop turn after the
    handler took the one before); counts the writes to the client's connection into ``writes``."""

    async def open_job(request: Any, model: str, *args: Any, **kwargs: Any) -> Relay:
        transport = request.transport
        write = transport.write

        def counted_write(data: bytes) -> None:
            writes.append(1)
            write(data)

        def counted_writelines(data: list[bytes]) -> None:
            writes.append(1)
            write(b"".join(data))  # (asyncio's writelines calls write: it would count twice)

        transport.write, transport.writelines = counted_write, counted_writelines
        ch = Channel("r1", model, None)  # type: ignore[arg-type]
        relay = Relay(_Bus(), ch, 5.0)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()

        def feed(i: int) -> None:
            for item in batches[i]:
                ch.push(item)
            if i + 1 < len(batches):
                loop.call_later(0.01, feed, i + 1)

        feed(0)
        await relay.head()
        return relay

    return open_job


# the answer in one read of the worker (one write to the client), or in two (two writes)
IN_ONE_OR_TWO_READS = pytest.mark.parametrize("pieces,expected_writes",
                                              [((STREAM,), 1), ((STREAM[:CUT], STREAM[CUT:]), 2)])


def batches_of(*pieces: bytes) -> list[list[StreamItem]]:
    out: list[list[StreamItem]] = [[Head(request_id="r1", status=200, content_type="text/event-stream")]]
    for i, piece in enumerate(pieces):
        batch: list[StreamItem] = [Data(request_id="r1", data=piece)]
        if i:
            out.append(batch)
        else:
            out[0] += batch
    out[-1].append(End(request_id="r1"))
    return out


@IN_ONE_OR_TWO_READS
async def test_ollama_stream_writes(gateway: Factory, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                    pieces: tuple[bytes, ...], expected_writes: int) -> None:
    writes: list[int] = []
    monkeypatch.setattr(ollama_app, "open_fitting", scripted(batches_of(*pieces), writes))
    c = await gateway("ollama")
    r = await c.post("/api/chat", json={"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]})
    lines = [json.loads(line) for line in (await r.read()).splitlines()]
    assert r.status == 200 and r.headers["Content-Type"] == "application/x-ndjson"
    assert all(not o["done"] for o in lines[:-1]) and lines[-1]["done"] and len(lines) > 2
    assert "".join(o["message"]["content"] for o in lines) == "".join(
        (json.loads(e[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for e in STREAM.decode().split("\n\n") if e.startswith("data: {"))
    assert len(writes) == expected_writes


@IN_ONE_OR_TWO_READS
async def test_openai_stream_writes(gateway: Factory, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
                                    pieces: tuple[bytes, ...], expected_writes: int) -> None:
    writes: list[int] = []
    monkeypatch.setattr(openai_app, "open_fitting", scripted(batches_of(*pieces), writes))
    c = await gateway("openai")
    model = json.loads(STREAM.split(b"\n\n")[0][6:])["model"]  # the backend's own name: relayed byte for byte
    r = await c.post("/v1/chat/completions", json={"model": model, "stream": True,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    assert await r.read() == STREAM
    assert len(writes) == expected_writes
