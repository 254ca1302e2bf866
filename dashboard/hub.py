"""One subscription to the metrics bus for the whole dashboard: the latest figures, and a fan-out to browsers.

Every browser connection gets a bounded queue of raw JSON events (a slow browser loses events, never blocks
the hub). The hub also keeps the latest event of each worker, gateway and process and the latest system
figures, for the Prometheus endpoint and for the snapshot a new browser starts from.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio

from bus import endpoints
from bus.codec import EVENTS, BusDecodeError

log = structlog.get_logger()

QUEUE_SIZE = 2000


ALWAYS = (endpoints.TOPIC_STATE.encode(), endpoints.TOPIC_METRICS.encode())
TOPIC_REQUESTS = endpoints.TOPIC_REQUEST.encode()
LIVE = ("starting", "ready", "stopping")  # a worker's states with a process
# worker_metrics figures of a running process (the totals stay: they are the last process' counts)
PROCESS_GAUGES = ("pid", "backend_pid", "cpu_percent", "rss_bytes", "in_flight", "queued", "tokens_per_s",
                  "requests_per_s", "uptime_s")

# worker_metrics counters: each process counts from 0, the totals kept here go on across a model's processes (a
# Prometheus rate over a model that loads and unloads often read ~1/6 of its requests)
COUNTERS = ("requests_total", "errors_total", "tokens_total")


class Hub:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.workers: dict[str, dict[str, Any]] = {}  # name -> merged worker_state + worker_metrics fields
        self.gateways: dict[str, dict[str, Any]] = {}  # protocol -> latest gateway_metrics
        self.processes: dict[str, dict[str, Any]] = {}  # name -> latest process_state
        self.system: dict[str, Any] = {}
        self.listeners: set[asyncio.Queue[bytes]] = set()
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._requests_on = False
        self._counted: dict[str, tuple[Any, dict[str, float]]] = {}  # model -> (its process' pid, its counts)
        self._before: dict[str, dict[str, float]] = {}  # model -> counts of its earlier processes

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        ctx = zmq.asyncio.Context.instance()
        sub = ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.rcvhwm = 10000
        sub.connect(endpoints.metrics(self.run_dir))
        for topic in ALWAYS:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        self._sub = sub
        self._want_requests(bool(self.listeners))
        self.ready.set()
        try:
            while True:
                frames = await sub.recv_multipart()
                self._on_frames(frames)
                for _ in range(256):  # drain what is queued without a wakeup per message
                    try:
                        frames = await sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
        finally:
            sub.close(0)

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        body = frames[1]
        try:  # (typed: a frame of the right shape with a wrong field, e.g. a string for a number, is dropped
            event = msgspec.to_builtins(EVENTS.decode(body))  # here, not kept to fail /metrics until the next status)
        except BusDecodeError:
            log.warning("bad_event", topic=frames[0][:100])
            return
        self.apply(event)
        self.broadcast(body)

    # ------------------------------------------------------------------ state
    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("worker_state", "worker_metrics"):
            name = str(event.get("name", ""))
            w = self.workers.setdefault(name, {"name": name})
            w.update({k: v for k, v in event.items() if k not in ("type", "v")})
            if kind == "worker_metrics":
                self._count_on(name, w, event)
            if w.get("state") not in LIVE:  # a process gone (a kill sends no last figures): none of its gauges
                for gauge in PROCESS_GAUGES:
                    if gauge in w:
                        w[gauge] = 0
        elif kind == "gateway_metrics":
            self.gateways[str(event.get("protocol", ""))] = event
        elif kind == "process_state":
            self.processes[str(event.get("name", ""))] = event
        elif kind == "system_metrics":
            self.system = event

    def _count_on(self, name: str, w: dict[str, Any], event: dict[str, Any]) -> None:
        """The model's counters as totals over its processes: a new process (another pid) adds the last counts of
        the one before to what is carried."""
        pid = event.get("pid")
        counts = {f: float(event.get(f) or 0) for f in COUNTERS}
        before = self._before.setdefault(name, dict.fromkeys(COUNTERS, 0.0))
        last = self._counted.get(name)
        if last is not None and last[0] != pid:
            for f in COUNTERS:
                before[f] += last[1][f]
        self._counted[name] = (pid, counts)
        for f in COUNTERS:
            w[f] = before[f] + counts[f]

    def apply_status(self, status: dict[str, Any]) -> None:
        """Merge a Status reply (the supervisor's authoritative list of workers and processes)."""
        names = set()
        for w in status.get("workers", []):
            names.add(w["name"])
            cur = self.workers.setdefault(w["name"], {"name": w["name"]})
            cur.update(w)
        for name in list(self.workers):
            if name not in names:
                del self.workers[name]  # removed from the config
        for p in status.get("processes", []):
            cur = self.processes.setdefault(p["name"], {})
            cur.update(p)

    def snapshot(self) -> dict[str, Any]:
        return {"type": "snapshot", "workers": list(self.workers.values()),
                "gateways": list(self.gateways.values()), "processes": list(self.processes.values()),
                "system": self.system}

    # ------------------------------------------------------------------ fan-out
    def listen(self) -> asyncio.Queue[bytes]:
        q: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        self.listeners.add(q)
        self._want_requests(True)
        return q

    def unlisten(self, q: asyncio.Queue[bytes]) -> None:
        self.listeners.discard(q)
        if not self.listeners:
            self._want_requests(False)

    def _want_requests(self, want: bool) -> None:
        """Per-request events only while a browser watches: every event wakes the bus proxy and this process,
        which cost the hot path ~1 ms a request on 2 cores (BENCHMARKS.md)."""
        sub = getattr(self, "_sub", None)
        if sub is None or want == self._requests_on:
            return
        sub.setsockopt(zmq.SUBSCRIBE if want else zmq.UNSUBSCRIBE, TOPIC_REQUESTS)
        self._requests_on = want

    def broadcast(self, body: bytes) -> None:
        for q in self.listeners:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(body)
