"""A gateway's link to one worker (gateway/bus_client.WorkerLink) and the worker's side of it (workers/bus_side.py):
the jobs of one loop tick go out as one message, a frame each, and the worker takes every job of such a message;
jobs finding the worker's queue full wait (in order) and, past the timeout, their requests get a 503."""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

import pytest
import zmq
import zmq.asyncio

from bus.codec import JOBS
from bus.protocol import Cancel, Fail, HttpJob, Job
from gateway import bus_client
from gateway.bus_client import Channel, WorkerLink
from workers.bus_side import WorkerBus


def job(rid: str) -> bytes:
    return JOBS.encode(HttpJob(request_id=rid, path="/v1/chat/completions", body=b"{}"))


def test_jobs_of_one_tick_leave_as_one_message_and_the_worker_takes_them_all() -> None:
    async def main() -> None:
        ctx = zmq.asyncio.Context()
        path = f"ipc://{tempfile.mkdtemp()}/w.sock"
        router = ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.bind(path)
        link = WorkerLink(ctx, "m", path)
        try:
            for rid in ("a", "b", "c"):
                link.send(rid, job(rid))
            frames = await asyncio.wait_for(router.recv_multipart(), 5)
            assert [JOBS.decode(f).request_id for f in frames[1:]] == ["a", "b", "c"]
            link.send("d", job("d"))  # a later tick: a message of its own
            await asyncio.sleep(0)
            link.send("d", JOBS.encode(Cancel(request_id="d")))
            frames = await asyncio.wait_for(router.recv_multipart(), 5)
            assert [type(JOBS.decode(f)).__name__ for f in frames[1:]] == ["HttpJob"]
            frames = await asyncio.wait_for(router.recv_multipart(), 5)
            assert [type(JOBS.decode(f)).__name__ for f in frames[1:]] == ["Cancel"]

            # the worker's side: every job of a message is dispatched, in order; a bad frame is skipped
            taken: list[tuple[bytes, str]] = []

            class Worker(WorkerBus):
                def _dispatch(self, ident: bytes, j: Job) -> None:
                    taken.append((ident, j.request_id))

            worker = Worker.__new__(Worker)
            worker._on_frames([zmq.Frame(b"gw"), zmq.Frame(job("x")), zmq.Frame(b"junk"), zmq.Frame(job("y"))])
            assert taken == [(b"gw", "x"), (b"gw", "y")]
        finally:
            link.close()
            router.close(0)
            ctx.term()

    asyncio.run(main())


class _FullFor:
    """A socket whose queue is full for the first ``n`` sends (gateway.bus_client's send_frames is pointed at
    its send_multipart)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent: list[list[bytes]] = []

    def send_multipart(self, frames: list[bytes], *args: Any, **kwargs: Any) -> None:
        if self.n > 0:
            self.n -= 1
            raise zmq.Again()
        self.sent.append(list(frames))


def test_jobs_wait_for_a_full_queue_in_order_then_get_a_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bus_client, "send_frames", lambda sock, frames: sock.send_multipart(frames))

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        link = WorkerLink(ctx, "m", f"ipc://{tempfile.mkdtemp()}/nobody.sock", full_timeout=0.2)
        try:
            # full for a few tries: the jobs go out later, in their order, before a newer one
            full = _FullFor(3)
            link.sock = full  # type: ignore[assignment]
            link.send("a", job("a"))
            link.send("b", job("b"))
            await asyncio.sleep(0.001)
            link.send("c", job("c"))
            for _ in range(200):
                if sum(len(m) for m in full.sent) == 3:
                    break
                await asyncio.sleep(0.005)
            assert [JOBS.decode(f).request_id for m in full.sent for f in m] == ["a", "b", "c"]

            # full for good: past the timeout, the waiting requests are answered 503
            link.sock = _FullFor(10**9)  # type: ignore[assignment]
            ch = link.channels["d"] = Channel("d", "m", link)
            link.send("d", job("d"))
            items = await asyncio.wait_for(ch.batch(5), 3)
            assert isinstance(items[0], Fail) and items[0].status == 503 and "queue is full" in items[0].message
            assert not link._out
            ch.close()
        finally:
            link.close()
            ctx.term()

    asyncio.run(main())


@pytest.mark.parametrize("how", ["replaced", "broken"])
def test_jobs_that_cannot_leave_go_to_the_next_worker(how: str) -> None:
    """A link replaced (closed) in the tick its job was queued, or broken under it (its reader stopped): the
    request gets a worker_* Fail, which open_relay retries on the model's next worker."""

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        link = WorkerLink(ctx, "m", f"ipc://{tempfile.mkdtemp()}/w.sock")
        ch = link.channels["a"] = Channel("a", "m", link)
        if how == "broken":
            link.reader.close()  # (what the reader does when the socket breaks under it)
        link.send("a", job("a"))
        if how == "replaced":
            link.close()  # in the same tick: the job never left
        items = await asyncio.wait_for(ch.batch(5), 3)
        assert isinstance(items[0], Fail) and items[0].code == f"worker_{'gone' if how == 'broken' else how}"
        ch.close()
        link.close()
        ctx.term()

    asyncio.run(main())
