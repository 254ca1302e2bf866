"""A worker builds and sends per-request events only while somebody subscribes to them: its XPUB hears the
subscriptions the supervisor's XSUB passes on (here an XSUB of the test's own, as the supervisor's proxy)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import zmq

from bus import endpoints
from bus.protocol import WorkerLaunch
from workers.metrics import WorkerStats
from workers.service import LlamaWorker


def test_request_events_follow_subscriptions() -> None:
    async def main() -> None:
        run_dir = Path(tempfile.mkdtemp(prefix="lr-gate-"))
        os.chmod(run_dir, 0o700)
        ctx = zmq.Context()
        xsub = ctx.socket(zmq.XSUB)
        xsub.linger = 0
        xsub.bind(endpoints.metrics_in(run_dir))
        launch = WorkerLaunch(name="m", kind="llama", model_path="/nonexistent.gguf", run_dir=str(run_dir),
                              logs_dir=str(run_dir), supervisor_pid=os.getpid())
        worker = LlamaWorker(launch)
        worker._sockets()
        sent: list[list[bytes]] = []

        class Counting:  # the worker's socket, counting what the stats hand it
            def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
                sent.append(frames)
                worker._pub.send_multipart(frames, flags)

        worker.stats.pub = Counting()  # type: ignore[assignment]
        worker.subscriptions_changed()
        try:
            async def until(cond: object, what: str) -> None:
                for _ in range(200):
                    if callable(cond) and cond():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(what)

            assert not worker.stats.wanted  # nobody listens yet
            await asyncio.sleep(0.3)  # the worker's connection is up (in the system, other publishers are there first)
            xsub.send(b"\x01metrics/")  # somebody wants metrics only: still no request events
            await until(lambda: b"metrics/" in worker.subscriptions, "the subscription reached the worker")
            assert not worker.stats.wanted
            xsub.send(b"\x01request/")  # the dashboard with a page open
            await until(lambda: worker.stats.wanted, "request events wanted")
            worker.stats.queued("r1", "/v1/chat/completions", False)
            assert len(sent) == 1 and xsub.poll(2000), "the event was published"
            topic, body = xsub.recv_multipart()
            assert topic == b"request/m/" and b'"phase":"queued"' in body
            xsub.send(b"\x00request/")  # the page closed
            await until(lambda: not worker.stats.wanted, "request events no longer wanted")
            before = len(sent)
            worker.stats.finished("r1", 200, "ok")
            assert len(sent) == before, "no event is even built while nobody listens"
            assert not xsub.poll(300)
        finally:
            worker._close_sockets()
            xsub.close(0)
            ctx.term()

    asyncio.run(main())


def test_stats_without_a_socket_never_publish() -> None:
    stats = WorkerStats("m")
    stats.queued("r", "/v1/completions", True)
    stats.finished("r", 200, "ok")  # no socket: nothing to do, nothing raised
