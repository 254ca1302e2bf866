"""A whisper worker process: a faster-whisper model in process, serving TranscribeJobs from gateways.

Same contract as the llama worker (workers/service.py): a ROUTER at ``endpoints.worker(run_dir, name, pid)``,
``WorkerHello`` STARTING -> READY (or FATAL) to the supervisor, metrics on the PUB bus, ``Cancel`` by
request_id, exit when the supervisor goes away. The model loads and every transcription runs in threads, so
the event loop keeps answering cancels, metrics and new jobs (queued, 429 beyond ``queue_size``) meanwhile.
Answers: ``Head`` (NDJSON), ``Data`` with the JSON lines produced since the last send, ``End`` or ``Fail``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
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
    TranscribeJob,
    WorkerLaunch,
    WorkerState,
)
from supervisor.child import install_stop_signals, watch_parent
from workers import whisper_engine as engine
from workers.bus_side import WorkerBus
from workers.whisper_stats import WhisperStats

log = structlog.get_logger()
NDJSON = "application/x-ndjson"
STOP_WAIT_S = 2.0  # at stop, how long running transcriptions get to reach their next segment boundary


class _Job:
    __slots__ = ("ident", "job", "cancel", "task", "fail")

    def __init__(self, ident: bytes, job: TranscribeJob) -> None:
        self.ident = ident
        self.job = job
        self.cancel = threading.Event()
        self.task: asyncio.Task[None] | None = None
        self.fail: Fail | None = None  # what to answer when cancelled (None: the gateway asked, answer nothing)


class WhisperWorker(WorkerBus):
    def __init__(self, launch: WorkerLaunch) -> None:
        super().__init__(launch)
        self.params = launch.whisper
        self.parallel = max(1, launch.params.parallel)
        self.executor = ThreadPoolExecutor(max_workers=self.parallel + 1, thread_name_prefix="whisper")
        self.model: Any = None
        self.stopping = asyncio.Event()
        self.jobs: dict[str, _Job] = {}
        self.slots = asyncio.Semaphore(self.parallel)
        self.waiting = self.in_flight = 0
        self.requests_total = self.errors_total = 0
        self.stats: WhisperStats = WhisperStats(launch.name)
        self.started = time.monotonic()
        self._enc = msgspec.json.Encoder()

    # ------------------------------------------------------------------ main
    async def run(self) -> int:
        self._sockets()
        install_stop_signals(self.stopping.set)
        parent = asyncio.create_task(watch_parent(self.launch.supervisor_pid, self.stopping.set))
        await self.hello(WorkerState.STARTING)
        try:
            loop = asyncio.get_running_loop()
            t0 = time.monotonic()
            load = loop.run_in_executor(self.executor, engine.load_model, self.launch.model_path, self.params,
                                        self.parallel)
            stop_wait = asyncio.create_task(self.stopping.wait())
            await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not load.done():  # a stop during the load aborts the start (the thread finishes on its own)
                return 0
            stop_wait.cancel()
            try:
                self.model = load.result()
            except Exception as exc:
                message = f"cannot load whisper model {self.launch.model_path}: {exc}"
                log.error("model_load_failed", error=message)
                await self.hello(WorkerState.FATAL, message)
                return 3
            await self.hello(WorkerState.READY)
            log.info("worker_ready", model_path=self.launch.model_path, load_s=round(time.monotonic() - t0, 2),
                     device=self.params.device, compute_type=self.params.compute_type,
                     cpu_threads=self.params.cpu_threads)
            return await self._serve()
        finally:
            parent.cancel()
            await self._shutdown()

    async def _serve(self) -> int:
        receiver = asyncio.create_task(self._receive())
        metrics = asyncio.create_task(self._metrics())
        stop_wait = asyncio.create_task(self.stopping.wait())
        done, _ = await asyncio.wait({receiver, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        for t in (receiver, metrics, stop_wait):
            t.cancel()
        if receiver in done and not receiver.cancelled() and receiver.exception():
            log.error("receiver_failed", error=repr(receiver.exception()))
            return 5
        return 0

    async def _shutdown(self) -> None:
        self.state = WorkerState.STOPPING
        jobs = list(self.jobs.values())
        for j in jobs:
            self._cancel(j, Fail(request_id=j.job.request_id, status=503, code="worker_stopping",
                                 message=f"model {self.launch.name!r} is stopping"))
        tasks = [j.task for j in jobs if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT_S)
        self.executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(zmq.ZMQError, TimeoutError):
            await asyncio.wait_for(self.hello(WorkerState.STOPPED), 0.5)
        self._close_sockets()

    # ------------------------------------------------------------------ jobs
    def _gateway_gone(self, ident: bytes) -> None:
        for j in list(self.jobs.values()):
            if j.ident == ident:
                self._cancel(j, None)

    def _dispatch(self, ident: bytes, job: Job) -> None:
        if isinstance(job, Cancel):
            j = self.jobs.get(job.request_id)
            if j is not None:
                self._cancel(j, None)
            return
        if isinstance(job, HttpJob):  # a chat/completion/... route sent a llama request to this model
            self.send_item(ident, Fail(
                request_id=job.request_id, status=400, code="wrong_model_type",
                message=f"model {self.launch.name!r} is a speech-to-text (whisper) model: "
                        "use POST /v1/audio/transcriptions or /v1/audio/translations"))
            return
        if job.request_id in self.jobs:
            log.warning("duplicate_request_id", request_id=job.request_id)
            return
        self.requests_total += 1
        self.stats.queued(job.request_id, job.task, job.stream, job.route, job.gateway)
        if len(self.jobs) >= self.parallel + self.launch.queue_size:  # running + queued, counted right now
            self.stats.finished(job.request_id, 429, "rejected")
            self.send_item(ident, Fail(request_id=job.request_id, status=429, code="busy",
                                         message=f"model {self.launch.name!r} is busy: queue is full"))
            return
        j = self.jobs[job.request_id] = _Job(ident, job)
        j.task = asyncio.create_task(self._run_job(j))

    def _cancel(self, j: _Job, fail: Fail | None) -> None:
        """Stop a job: its thread stops at the next segment boundary; a queued job never starts."""
        j.fail = fail
        j.cancel.set()
        if j.task is not None:
            j.task.cancel()

    async def _run_job(self, j: _Job) -> None:
        rid = j.job.request_id
        status, outcome, tokens = 200, "ok", 0
        try:
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
            try:
                self.in_flight += 1
                self.stats.started(rid)
                tokens = await self._transcribe(j)
            finally:
                self.in_flight -= 1
                self.slots.release()
        except asyncio.CancelledError:
            status, outcome = (j.fail.status, "error") if j.fail is not None else (499, "cancelled")
            if j.fail is not None:
                self.send_item(j.ident, j.fail)
        except engine.AudioError as exc:  # (the client's: not counted in errors_total, 5xx ones only)
            status, outcome = 400, "error"
            self.send_item(j.ident, Fail(request_id=rid, status=400, message=str(exc), code=exc.code,
                                         param=exc.param))
        except Exception as exc:  # never let one request take the worker down
            self.errors_total += 1
            status, outcome = 500, "error"
            log.exception("job_failed", request_id=rid)
            self.send_item(j.ident, Fail(request_id=rid, status=500, code="transcription_failed",
                                           message=f"faster-whisper: {type(exc).__name__}: {exc}",
                                           source="backend"))
        finally:
            self.jobs.pop(rid, None)
            self.stats.finished(rid, status, outcome, tokens)

    async def _transcribe(self, j: _Job) -> int:
        """Run the transcription in a thread; send its lines as they come, all queued ones in one Data."""
        loop = asyncio.get_running_loop()
        rid = j.job.request_id
        lines: list[bytes] = []
        wake = asyncio.Event()

        def emit(line: engine.Line) -> None:  # in the thread
            data = self._enc.encode(line) + b"\n"
            loop.call_soon_threadsafe(_push, data)

        def _push(data: bytes) -> None:
            lines.append(data)
            wake.set()

        fut = loop.run_in_executor(self.executor, engine.transcribe, self.model, j.job, self.params, emit,
                                   j.cancel.is_set)
        head_sent = False
        try:
            while True:
                waiter: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
                await asyncio.wait([fut, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                wake.clear()
                await asyncio.sleep(0)  # let lines scheduled by the thread before it returned land
                if lines:
                    if not head_sent:
                        head_sent = self.send_item(j.ident, Head(request_id=rid, status=200, content_type=NDJSON))
                        if not head_sent:
                            j.cancel.set()
                    data, lines[:] = b"".join(lines), []
                    if b'"type":"segment"' in data:
                        self.stats.segment(rid)
                    if head_sent and not self.send_item(j.ident, Data(request_id=rid, data=data)):
                        j.cancel.set()  # the gateway is gone: stop at the next segment
                if fut.done():
                    break
            tokens: int = fut.result()  # raises AudioError / the thread's error
        except asyncio.CancelledError:
            j.cancel.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(fut)  # hold the slot until the thread really stops
            raise
        except engine.Cancelled:
            raise asyncio.CancelledError from None
        if not head_sent:
            self.send_item(j.ident, Head(request_id=rid, status=200, content_type=NDJSON))
        self.send_item(j.ident, End(request_id=rid))
        return tokens

    # ------------------------------------------------------------------ metrics
    async def _metrics(self) -> None:
        me = psutil.Process()
        while True:
            self.publish_figures(self.figures(me.cpu_percent(), me.memory_info().rss))
            await asyncio.sleep(1.0)
