"""A llama worker process: serves Jobs from gateways on its ROUTER, relaying its llama-server's output.

Hot path (issue 7, measured in BENCHMARKS.md): llama-server is spoken to through workers/backend_http.py, whose
reads are handed over as they come (everything llama-server produced since the last read, never one message per
token); the answer's items leave through the Outbox (bus/pump.py): one frame per gateway per loop tick, so a small
answer's head, body and end cross the bus as one message. Once a stream flows (its first token went out), reads
closer than 0.5 ms apart wait that long (a loop turn under uvloop) and data waits up to 1 ms for company: a fast
stream moves in fewer, larger messages; a real model's tokens (tens of ms apart) and every first token are never
held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import psutil
import structlog
import zmq
import zmq.asyncio

from bus.protocol import (
    Cancel,
    Data,
    End,
    Fail,
    Head,
    HttpJob,
    Job,
    WorkerLaunch,
    WorkerState,
)
from supervisor.child import install_stop_signals, watch_parent
from workers.backend_http import BackendHTTPError, BackendPool
from workers.bus_side import WorkerBus
from workers.llama_server import BackendError, LlamaServer
from workers.metrics import WorkerStats

log = structlog.get_logger()

FULL_WAIT_S = 0.5  # how long a request meeting a full queue waits for a place before it is refused

class LlamaWorker(WorkerBus):
    def __init__(self, launch: WorkerLaunch, load_timeout: float = 120.0) -> None:
        super().__init__(launch)
        self.load_timeout = load_timeout
        self.backend = LlamaServer(launch, Path(launch.logs_dir) / f"worker-{launch.name}.llama-server.log")
        self.stopping = asyncio.Event()
        self.jobs: dict[str, asyncio.Task[None]] = {}
        self.idents: dict[str, bytes] = {}  # request id -> the gateway it answers
        self.slots = asyncio.Semaphore(max(1, launch.params.parallel))
        self.waiting = 0
        self.in_flight = 0
        self.requests_total = 0
        self.errors_total = 0
        self.started = time.monotonic()
        self.stats: WorkerStats = WorkerStats(launch.name)
        self.pool: BackendPool | None = None

    async def hello(self, state: WorkerState, message: str = "", backend_pid: int = 0) -> None:
        await super().hello(state, message, backend_pid or self.backend.pid)

    # ------------------------------------------------------------------ main
    async def run(self) -> int:
        self._sockets()
        install_stop_signals(self.stopping.set)
        parent = asyncio.create_task(watch_parent(self.launch.supervisor_pid, self.stopping.set))
        await self.hello(WorkerState.STARTING)
        code = 0
        try:
            start = asyncio.create_task(self.backend.start(self.load_timeout))
            stop_wait = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not start.done():  # a stop during the start aborts the start
                start.cancel()
                return 0
            stop_wait.cancel()
            try:
                start.result()
            except BackendError as exc:
                log.error("backend_start_failed", error=str(exc))
                await self.hello(WorkerState.FATAL, str(exc))
                return 3
            self.pool = self.backend.pool()
            await self.hello(WorkerState.READY)
            log.info("worker_ready", port=self.backend.port, backend_pid=self.backend.pid)
            code = await self._serve()
        finally:
            parent.cancel()
            await self._shutdown()
        return code

    async def _serve(self) -> int:
        receiver = asyncio.create_task(self._receive())
        metrics = asyncio.create_task(self._metrics())
        backend_exit = asyncio.create_task(self.backend.wait())
        stop_wait = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({receiver, backend_exit, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        for t in (receiver, metrics, backend_exit, stop_wait):
            t.cancel()
        if backend_exit in done:
            msg = self.backend.exit_reason(" unexpectedly")
            log.error("backend_exited", message=msg, output=self.backend.last_output())
            await self._fail_all(502, "backend_exited", msg)
            with contextlib.suppress(zmq.ZMQError, TimeoutError):  # why this worker exits, for the supervisor
                await asyncio.wait_for(self.hello(WorkerState.FATAL, msg), 0.5)
            return 4
        if receiver in done and receiver.exception():
            log.error("receiver_failed", error=repr(receiver.exception()))
            return 5
        return 0

    async def _shutdown(self) -> None:
        self.state = WorkerState.STOPPING
        await self._fail_all(503, "worker_stopping", f"model {self.launch.name!r} is stopping")
        await self.backend.stop()
        if self.pool is not None:
            self.pool.close()
        with contextlib.suppress(zmq.ZMQError, TimeoutError):
            await asyncio.wait_for(self.hello(WorkerState.STOPPED, backend_pid=self.backend.pid), 0.5)
        self._close_sockets()

    async def _fail_all(self, status: int, code: str, message: str) -> None:
        tasks = list(self.jobs.values())
        for task in tasks:
            task.cancel(msg=f"{status}|{code}|{message}")
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ jobs
    def _gateway_gone(self, ident: bytes) -> None:
        for rid, task in list(self.jobs.items()):
            if self.idents.get(rid) == ident:
                task.cancel(msg="gateway gone")

    def _dispatch(self, ident: bytes, job: Job) -> None:
        if isinstance(job, Cancel):
            task = self.jobs.get(job.request_id)
            if task:
                task.cancel(msg="cancel")
            return
        if not isinstance(job, HttpJob):  # e.g. audio sent to a llama model
            fail = Fail(request_id=job.request_id, status=400, code="wrong_model_kind",
                        message=f"model {self.launch.name!r} does not take {type(job).__name__} requests")
            self.send_item(ident, fail)
            return
        if job.request_id in self.jobs:
            log.warning("duplicate_request_id", request_id=job.request_id)
            return
        self.idents[job.request_id] = ident
        self.jobs[job.request_id] = asyncio.create_task(self._run_job(ident, job))

    async def _run_job(self, ident: bytes, job: HttpJob) -> None:
        rid = job.request_id
        self.requests_total += 1
        full = self.waiting >= self.launch.queue_size and self.slots.locked()
        if full:  # (a client that gave up and asked again at once: its first request's place frees as that job
            # unwinds, after its cancel, which may even come after the new job (another connection); the new one
            # was refused "queue is full" at exactly the model's capacity)
            deadline = asyncio.get_running_loop().time() + FULL_WAIT_S
            while full and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.005)
                full = self.waiting >= self.launch.queue_size and self.slots.locked()
        self.stats.queued(rid, job.path, job.stream, job.route, job.gateway, rejected=full)
        under_way = False
        try:
            if full:
                self.stats.finished(rid, 429, "rejected")
                self.send_item(ident, Fail(request_id=rid, status=429, code="busy",
                                             message=f"model {self.launch.name!r} is busy: queue is full"))
                return
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
            try:
                self.in_flight += 1
                under_way = True
                await self._forward(ident, job)
            finally:
                self.in_flight -= 1
                self.slots.release()
        except asyncio.CancelledError as exc:
            reason = exc.args[0] if exc.args else ""
            if isinstance(reason, str) and reason.count("|") >= 2:  # (stopped by us: not the client's doing)
                status, code, message = reason.split("|", 2)
                if code == "backend_exited" and under_way:  # (a queued one is sent to the next worker; one that
                    # llama-server was answering is not: its prompt may be what made it fail, and would again)
                    code, message = "backend_exited_under_way", f"{message}; the request was under way"
                self.stats.finished(rid, int(status), "error")
                self.send_item(ident, Fail(request_id=rid, status=int(status), code=code, message=message))
        except Exception as exc:  # never let one request take the worker down
            self.errors_total += 1
            log.exception("job_failed", request_id=rid)
            self.send_item(ident, Fail(request_id=rid, status=500, code="internal", message=repr(exc)))
        finally:
            self.stats.finished(rid, 499, "cancelled")  # no-op when _forward already finished it
            self.jobs.pop(rid, None)
            self.idents.pop(rid, None)

    async def _forward(self, ident: bytes, job: HttpJob) -> None:
        assert self.pool is not None
        rid = job.request_id
        stats = self.stats
        stats.started(rid)
        status = 0
        flowing = False

        def on_head(code: int, content_type: str) -> bool:
            nonlocal status
            status = code
            if code >= 500:
                self.errors_total += 1
            return self.send_item(ident, Head(request_id=rid, status=code, content_type=content_type))

        def on_data(chunk: bytes) -> bool:  # one backend read; False: the gateway is gone, llama-server is let go
            nonlocal flowing
            # everything up to the first token goes out at once; more of a flowing stream may wait for company
            urgent = not flowing
            flowing = stats.data(rid, chunk)
            return self.send_item(ident, Data(request_id=rid, data=chunk), urgent=urgent)

        def is_flowing() -> bool:
            return flowing

        def on_end() -> None:  # in the same loop turn as the last data: one bus frame for a small answer
            self.send_item(ident, End(request_id=rid))
            stats.finished(rid, status, "ok" if status < 400 else "error")

        try:
            await self.pool.request(job.method, job.path, job.body, on_head, on_data, is_flowing, on_end)
        except BackendHTTPError as exc:
            self.errors_total += 1
            stats.finished(rid, 502, "error")
            self.send_item(ident, Fail(request_id=rid, status=502, code="backend_error",
                                       message=f"llama-server: {exc}", source="backend"))
            return

    # ------------------------------------------------------------------ metrics
    async def _metrics(self) -> None:
        me = psutil.Process()
        backend = None
        while True:
            rss = me.memory_info().rss
            cpu = me.cpu_percent()
            try:
                backend = backend or psutil.Process(self.backend.pid)
                rss += backend.memory_info().rss
                cpu += backend.cpu_percent()
            except psutil.Error:
                backend = None
            self.publish_figures(self.figures(cpu, rss, self.backend.pid))
            await asyncio.sleep(1.0)
