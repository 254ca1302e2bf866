"""What every worker shares on the bus: its sockets, its hellos to the supervisor, answering gateways.

- control: DEALER to the supervisor (WorkerHello on every state change)
- pub: XPUB into the metrics bus (an XPUB to hear subscriptions: request events are built only when wanted)
- router: ROUTER at endpoints.worker(run_dir, name, pid), where gateways send Jobs and get StreamItems back (read from
  the loop's reader callback, answered through an Outbox: one frame per gateway per loop tick, see bus/pump.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import structlog
import zmq
import zmq.asyncio

from bus import endpoints
from bus.codec import COMMANDS, JOBS, BusDecodeError, encode_event
from bus.protocol import Data, End, Fail, Head, Job, WorkerHello, WorkerLaunch, WorkerMetrics, WorkerState
from bus.pump import NOBLOCK, Outbox, Reader, sync_view
from supervisor.child import pid_alive
from workers.metrics import RequestFigures

log = structlog.get_logger()
FINAL_LINGER_MS = 200  # the last messages' time to leave at a stop (none when the supervisor is gone)


class WorkerBus:
    # each worker's own figures (set by its __init__), wired to the metrics bus here
    stats: RequestFigures
    requests_total: int
    errors_total: int
    in_flight: int
    waiting: int
    started: float  # monotonic time the worker process started

    def __init__(self, launch: WorkerLaunch) -> None:
        self.launch = launch
        self.ctx = zmq.asyncio.Context()
        self.endpoint = endpoints.worker(launch.run_dir, launch.name, os.getpid())
        self.state = WorkerState.STARTING
        self._background: set[asyncio.Task[object]] = set()

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run ``coro`` in the background, holding a reference until it is done."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _sockets(self) -> None:
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.linger = 0
        self.control.connect(endpoints.control(self.launch.run_dir))
        # An XPUB, not a PUB: it hears which topics anybody subscribes to (the supervisor's proxy passes them on), so
        # per-request events are not even built while nobody listens (they cost ~10% of a tiny request).
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.linger = 0
        self.pub.sndhwm = 1000
        self.pub.connect(endpoints.metrics_in(self.launch.run_dir))
        self._pub = sync_view(self.pub)
        self.stats.pub = self._pub  # per-request events: sync, never awaited
        self.subscriptions: set[bytes] = set()
        self.subscriptions_changed()
        self._sub_reader = Reader(self.pub, self._on_subscription)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone gateway fails instead of vanishing
        self.router.sndhwm = 10000
        for path, pid in endpoints.worker_sockets(self.launch.run_dir, self.launch.name):
            if pid != os.getpid() and not pid_alive(pid):  # (left by a worker killed)
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.router.bind(self.endpoint)
        self.outbox = Outbox(self.router, self._gateway_gone)

    def _on_subscription(self, frames: list[zmq.Frame]) -> None:
        msg = frames[0].bytes
        if msg[:1] == b"\x01":
            self.subscriptions.add(msg[1:])
        elif msg[:1] == b"\x00":
            self.subscriptions.discard(msg[1:])
        self.subscriptions_changed()

    def subscriptions_changed(self) -> None:
        """Somebody subscribed or unsubscribed on the metrics bus: are this model's request events wanted?"""
        self.stats.wanted = self.wanted(self.stats.topic)

    def wanted(self, topic: str) -> bool:
        """Does any subscriber want events of ``topic``?"""
        raw = topic.encode()
        return any(raw.startswith(s) for s in self.subscriptions)

    def publish(self, frames: list[bytes]) -> None:
        """Publish an event now (dropped when the bus is full or gone: events never block a worker)."""
        with contextlib.suppress(zmq.ZMQError):
            self._pub.send_multipart(frames, NOBLOCK)

    def figures(self, cpu_percent: float = 0.0, rss_bytes: int = 0, backend_pid: int = 0,
                final: bool = False) -> WorkerMetrics:
        """This worker's periodic WorkerMetrics (its process figures given: each kind of worker has its own);
        ``final``: its last, at its stop (state stopped, its totals, no process figures)."""
        totals: dict[str, Any] = {
            "name": self.launch.name, "requests_total": self.requests_total, "errors_total": self.errors_total,
            "tokens_total": self.stats.tokens_total, "ttft_last_s": self.stats.ttft_last,
            "ttft_p50_s": self.stats.ttft_p50(), "model_path": self.launch.model_path}
        if final:
            return WorkerMetrics(state=WorkerState.STOPPED, **totals)
        tps, rps = self.stats.rates(self.requests_total)
        return WorkerMetrics(
            state=self.state, pid=os.getpid(), backend_pid=backend_pid, cpu_percent=cpu_percent, rss_bytes=rss_bytes,
            in_flight=self.in_flight, queued=self.waiting, uptime_s=time.monotonic() - self.started,
            tokens_per_s=tps, requests_per_s=rps, **totals)

    def publish_figures(self, event: WorkerMetrics) -> None:
        self.publish(encode_event(endpoints.topic_worker_metrics(self.launch.name), event))

    def _close_sockets(self) -> None:
        self._sub_reader.close()
        self.outbox.flush()  # the last items (e.g. Fails of a stop) leave before the sockets close
        # The last figures: the totals since the previous periodic event (they were lost), and state "stopped"
        # (a subscriber kept the last periodic one: "ready", its memory and uptime, for a model long stopped).
        self.publish_figures(self.figures(final=True))
        self.router.close(linger=0)
        if self.endpoint.startswith("ipc://"):  # (libzmq leaves an ipc socket's file behind: one per process)
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint.removeprefix("ipc://"))
        for sock in (self.control, self.pub):  # (a last hello, e.g. why it failed, and the last figures)
            sock.close(linger=FINAL_LINGER_MS)
        self.ctx.term()

    async def hello(self, state: WorkerState, message: str = "", backend_pid: int = 0) -> None:
        self.state = state
        await self.control.send(COMMANDS.encode(WorkerHello(
            request_id=uuid.uuid4().hex, name=self.launch.name, pid=os.getpid(), state=state,
            endpoint=self.endpoint if state == WorkerState.READY else "", backend_pid=backend_pid,
            message=message)))

    def send_item(self, ident: bytes, item: Head | Data | End | Fail, urgent: bool = True) -> bool:
        """Queue ``item`` for the gateway ``ident`` (sent at the end of this loop tick, with every other item for
        it; within 1 ms if not ``urgent``); False once that gateway is known to be gone."""
        return self.outbox.put(ident, item, urgent)

    def _gateway_gone(self, ident: bytes) -> None:
        """A gateway went away: its jobs are cancelled (overridden by each worker)."""

    async def _receive(self) -> None:
        """Serve until cancelled: each job that arrives is handed to ``_dispatch`` from the reader callback."""
        reader = Reader(self.router, self._on_frames)
        self.outbox.reader = reader
        try:
            await asyncio.get_running_loop().create_future()  # forever
        finally:
            reader.close()

    def _dispatch(self, ident: bytes, job: Job) -> None:
        raise NotImplementedError

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        """[gateway ident, job, job...]: a gateway sends the jobs of one loop tick as one message."""
        if len(frames) < 2:
            log.warning("bad_job_frames", count=len(frames))
            return
        ident = frames[0].bytes
        for frame in frames[1:]:
            try:
                job = JOBS.decode(frame.buffer)
            except BusDecodeError as exc:
                log.warning("bad_job", error=str(exc))
                continue
            self._dispatch(ident, job)
