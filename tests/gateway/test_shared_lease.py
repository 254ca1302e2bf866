"""Requests that leave keep-alive to the model share one supervisor lease per model (no round trip each)."""

from __future__ import annotations

import asyncio
from typing import Any

from bus.protocol import Release, WorkerEndpoint
from gateway import bus_client
from gateway.bus_client import GatewayBus


class Recorder:
    def __init__(self) -> None:
        self.remote = 0
        self.released: list[str] = []

    async def acquire_remote(self, model: str, keep_alive: float | None) -> WorkerEndpoint:
        self.remote += 1
        return WorkerEndpoint(request_id=f"lease-{self.remote}", model="m", endpoint="ipc:///nowhere")

    def notify(self, cmd: Any) -> None:
        assert isinstance(cmd, Release)
        self.released.append(cmd.lease)


def make_bus(monkeypatch: Any) -> tuple[GatewayBus, Recorder]:
    rec = Recorder()
    bus = GatewayBus("/nonexistent", 5.0)
    monkeypatch.setattr(bus, "_acquire_remote", rec.acquire_remote)
    monkeypatch.setattr(bus.control, "notify", rec.notify)
    monkeypatch.setattr(bus_client, "SHARED_LINGER_S", 0.05)
    return bus, rec


async def test_back_to_back_and_concurrent_requests_share_one_lease(monkeypatch: Any) -> None:
    bus, rec = make_bus(monkeypatch)
    a = await bus.acquire("m")
    b = await bus.acquire("m")
    assert rec.remote == 1 and a.request_id == b.request_id
    bus.release(a.request_id)
    bus.release(b.request_id)
    c = await bus.acquire("m")  # within the linger: still shared
    assert rec.remote == 1
    bus.release(c.request_id)
    await asyncio.sleep(0.1)
    assert rec.released == ["lease-1"]  # released once, after the linger
    await bus.acquire("m")
    assert rec.remote == 2


async def test_a_lease_in_steady_use_lingers_from_its_last_release(monkeypatch: Any) -> None:
    bus, rec = make_bus(monkeypatch)  # (linger 0.05 s)
    for _ in range(8):  # a request every 0.02 s for 0.16 s: past the first release's linger, never idle that long
        we = await bus.acquire("m")
        bus.release(we.request_id)
        await asyncio.sleep(0.02)
    assert rec.remote == 1 and rec.released == []
    await asyncio.sleep(0.08)
    assert rec.released == ["lease-1"]
    held = await bus.acquire("m")  # a new lease, held past the linger: it stays while in use
    await asyncio.sleep(0.1)
    assert rec.remote == 2 and rec.released == ["lease-1"]
    bus.release(held.request_id)
    await asyncio.sleep(0.08)
    assert rec.released == ["lease-1", "lease-2"]


async def test_explicit_keep_alive_and_a_gone_worker_ask_the_supervisor(monkeypatch: Any) -> None:
    bus, rec = make_bus(monkeypatch)
    shared = await bus.acquire("m")
    own = await bus.acquire("m", keep_alive=0)  # its own lease: the supervisor applies its keep-alive
    assert rec.remote == 2
    bus.release(own.request_id)
    assert rec.released == [own.request_id]
    bus.invalidate("m")  # the worker left READY: the next request asks again, the old lease goes when done
    await bus.acquire("m")
    assert rec.remote == 3
    bus.release(shared.request_id)
    assert shared.request_id in rec.released
