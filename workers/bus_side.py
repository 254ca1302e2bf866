"""What every worker shares on the bus: its sockets, its hellos to the supervisor, answering gateways.

- control: DEALER to the supervisor (WorkerHello on every state change)
- pub: PUB into the metrics bus
- router: ROUTER at endpoints.worker(run_dir, name), where gateways send Jobs and get StreamItems back
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Coroutine
from typing import Any

import structlog
import zmq
import zmq.asyncio

from bus import endpoints
from bus.codec import COMMANDS, JOBS, STREAM, BusDecodeError
from bus.protocol import Data, End, Fail, Head, Job, WorkerHello, WorkerLaunch, WorkerState

log = structlog.get_logger()
DRAIN_CAP = 256


class WorkerBus:
    def __init__(self, launch: WorkerLaunch) -> None:
        self.launch = launch
        self.ctx = zmq.asyncio.Context()
        self.endpoint = endpoints.worker(launch.run_dir, launch.name)
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
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.linger = 0
        self.pub.sndhwm = 1000
        self.pub.connect(endpoints.metrics_in(self.launch.run_dir))
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a gone gateway fails instead of vanishing
        self.router.sndhwm = 10000
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.endpoint.removeprefix("ipc://"))
        self.router.bind(self.endpoint)

    def _close_sockets(self) -> None:
        for sock in (self.router, self.control, self.pub):
            sock.close(linger=0)
        self.ctx.term()

    async def hello(self, state: WorkerState, message: str = "", backend_pid: int = 0) -> None:
        self.state = state
        await self.control.send(COMMANDS.encode(WorkerHello(
            request_id=uuid.uuid4().hex, name=self.launch.name, pid=os.getpid(), state=state,
            endpoint=self.endpoint if state == WorkerState.READY else "", backend_pid=backend_pid,
            message=message)))

    async def _send(self, ident: bytes, item: Head | Data | End | Fail) -> bool:
        try:
            await self.router.send_multipart([ident, STREAM.encode(item)], copy=False)
            return True
        except zmq.ZMQError as exc:  # EHOSTUNREACH: that gateway is gone
            log.info("gateway_unreachable", error=str(exc))
            return False

    async def _next_jobs(self) -> list[tuple[bytes, Job]]:
        """Wait for jobs; return every one already queued (bounded), decoded. Bad frames are logged and dropped."""
        out: list[tuple[bytes, Job]] = []
        frames = await self.router.recv_multipart(copy=False)
        self._decode(frames, out)
        for _ in range(DRAIN_CAP):
            try:
                frames = await self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._decode(frames, out)
        return out

    @staticmethod
    def _decode(frames: list[zmq.Frame], out: list[tuple[bytes, Job]]) -> None:
        if len(frames) != 2:
            log.warning("bad_job_frames", count=len(frames))
            return
        try:
            out.append((frames[0].bytes, JOBS.decode(frames[1].buffer)))
        except BusDecodeError as exc:
            log.warning("bad_job", error=str(exc))
