"""A gateway's side of the bus: acquire a worker from the supervisor, send jobs, receive streams.

One DEALER per worker endpoint, read from the loop's reader callback (bus/pump.py), which hands each frame's items
to per-request channels; a request handler wakes once per batch and writes it in one go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import structlog
import zmq
import zmq.asyncio

from bus import endpoints
from bus.codec import EVENTS, JOBS, STREAM, BusDecodeError
from bus.control_client import ControlClient, ControlTimeout, new_id
from bus.protocol import (
    Acquire,
    Cancel,
    ConfigReloaded,
    ErrorReply,
    Fail,
    HttpJob,
    Job,
    ProcessHello,
    Release,
    Status,
    StatusReply,
    StopWorker,
    StreamItem,
    WorkerEndpoint,
    WorkerState,
    WorkerStateEvent,
)
from bus.pump import Reader, send_frames, sync_view
from gateway.errors import ApiError

log = structlog.get_logger()

class Channel:
    """The stream of one request: items arrive from the worker link, the handler takes them in batches.

    A handler waiting longer than ``timeout`` for the next item gets a 504. One timer per request checks that (not a
    timeout context per wait: that cost a timer handle and two callbacks per batch on the hot path)."""

    __slots__ = ("request_id", "worker", "link", "_items", "_waiter", "finished", "lease", "_timer", "_since",
                 "_expired", "_loop")

    def __init__(self, request_id: str, worker: str, link: WorkerLink, lease: str = "") -> None:
        self.request_id = request_id
        self.lease = lease
        self.worker = worker
        self.link = link
        self._items: list[StreamItem] = []
        self._waiter: asyncio.Future[None] | None = None
        self.finished = False
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._since = 0.0  # loop time the handler started waiting, or of the last item since
        self._expired = False

    def push(self, item: StreamItem) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def batch(self, timeout: float) -> list[StreamItem]:
        if not self._items:
            loop = self._loop
            self._since = loop.time()
            if self._timer is None:
                self._timer = loop.call_later(timeout, self._check, timeout)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if self._expired and not self._items:
                self._expired = False
                raise ApiError(504, f"no answer from model {self.worker!r} within {timeout:.0f}s", code="timeout")
        items, self._items = self._items, []
        return items

    def _check(self, timeout: float) -> None:
        waited = self._loop.time() - self._since
        waiter = self._waiter
        if waiter is not None and not waiter.done() and waited >= timeout * 0.999:
            self._timer = None
            self._expired = True
            waiter.set_result(None)
        else:  # busy meanwhile: check again when the current wait would reach the timeout
            self._timer = self._loop.call_later(max(timeout - waited, 0.001) if waiter else timeout, self._check,
                                                timeout)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


JOB_RETRY_S = 0.002  # the worker's queue is full (HWM): try again this much later


class WorkerLink:
    """One DEALER to a worker's ROUTER: the jobs of one loop tick go out as one message (a frame each: requests
    arriving together cost the worker one wakeup, and this process one send), stream frames (each a batch of items)
    are read from the loop's reader callback and pushed to their requests' channels (bus/pump.py)."""

    def __init__(self, ctx: zmq.asyncio.Context, name: str, endpoint: str, full_timeout: float = 120.0) -> None:
        self.name = name
        self.endpoint = endpoint
        self.full_timeout = full_timeout  # a job waits this long for a full queue, then its request gets a 503
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.rcvhwm = 100000
        sock.connect(endpoint)
        self.sock = sync_view(sock)
        self._owner = sock
        self.channels: dict[str, Channel] = {}
        self.reader = Reader(sock, self._on_frames)
        self._loop = asyncio.get_running_loop()
        self._out: list[tuple[str, bytes]] = []  # (request id, job) to send at the end of this tick, in order
        self._scheduled = False
        self._full_since = 0.0  # loop time the worker's queue was first found full (0: it is not)

    def send(self, request_id: str, payload: bytes) -> None:
        """Queue a job for the end of this loop tick (with every other job of the tick: one message)."""
        self._out.append((request_id, payload))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        out, self._out = self._out, []
        if not out:
            return
        if self.reader.closed:  # the link broke: these requests go to the model's next worker (gateway/server.py)
            self._fail(out, 502, "worker_gone", f"model {self.name!r}: the link to its worker broke")
            return
        try:
            send_frames(self.sock, [job for _, job in out])
            self._full_since = 0.0
        except zmq.Again:  # the worker's queue is full: these jobs wait (a while), ahead of any newer ones
            self._out[:0] = out
            now = self._loop.time()
            self._full_since = self._full_since or now
            if now - self._full_since > self.full_timeout:
                self._refuse_waiting()
            elif not self._scheduled:
                self._scheduled = True
                self._loop.call_later(JOB_RETRY_S, self._flush)
            return
        except zmq.ZMQError as exc:  # closed under us: as a broken link
            log.info("job_send_failed", worker=self.name, error=str(exc))
            self._fail(out, 502, "worker_gone", f"model {self.name!r}: the link to its worker broke")
            return
        self.reader.kick()  # (a send may swallow the signal of an arriving message)

    def _refuse_waiting(self) -> None:
        waiting, self._out = self._out, []
        self._full_since = 0.0
        self._fail(waiting, 503, "unavailable", f"model {self.name!r} is not taking requests (its queue is full)")

    def _fail(self, jobs: list[tuple[str, bytes]], status: int, code: str, message: str) -> None:
        """The requests of ``jobs`` (never sent) get ``Fail``; a ``worker_*`` code sends them to the next worker."""
        for rid, _ in jobs:
            ch = self.channels.get(rid)
            if ch is not None:
                ch.push(Fail(request_id=rid, status=status, code=code, message=message))

    def _on_frames(self, frames: list[zmq.Frame]) -> None:
        for frame in frames:
            try:
                items = STREAM.decode(frame.buffer)
            except BusDecodeError as exc:
                log.warning("bad_stream_item", worker=self.name, error=str(exc))
                continue
            channels = self.channels
            for item in items:
                ch = channels.get(item.request_id)
                if ch is not None:
                    ch.push(item)

    def fail_all(self, status: int, code: str, message: str) -> None:
        for ch in list(self.channels.values()):
            ch.push(Fail(request_id=ch.request_id, status=status, code=code, message=message))

    def close(self) -> None:
        unsent, self._out = self._out, []  # their requests go to the model's next worker (gateway/server.py)
        self._fail(unsent, 502, "worker_replaced", f"model {self.name!r}: its worker was replaced before the job "
                   "was sent")
        self.reader.close()
        self._owner.close(0)


SHARED_LINGER_S = 0.25  # a shared lease outlives its last request this long (back-to-back requests reuse it)


class _SharedLease:
    """One timer checks the linger (not a timer per release, cancelled by the next request: a timer handle
    made and cancelled per request on the hot path)."""

    __slots__ = ("model", "we", "users", "timer", "valid", "idle_since")

    def __init__(self, model: str, we: WorkerEndpoint) -> None:
        self.model, self.we = model, we
        self.users = 1
        self.timer: asyncio.TimerHandle | None = None
        self.valid = True
        self.idle_since = 0.0  # loop time its last user let go

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class GatewayBus:
    def __init__(self, run_dir: Path | str, load_timeout: float, name: str = "",
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.name = name
        self.run_dir = run_dir
        self.load_timeout = load_timeout
        self._own_ctx = ctx is None  # a process shares one context (each one is two threads)
        self.ctx = ctx or zmq.asyncio.Context()
        self.control = ControlClient(run_dir, self.ctx)
        self.links: dict[str, WorkerLink] = {}  # by worker name
        self._shared: dict[str, _SharedLease] = {}  # by model name as asked for
        self._shared_by_lease: dict[str, _SharedLease] = {}
        self._events: asyncio.Task[None] | None = None
        self.on_config_reloaded: Callable[[], None] | None = None

    def fail_all(self, status: int, code: str, message: str) -> None:
        """Every request under way (queued at its worker, or streaming) gets ``Fail``: its client an error in
        its protocol's shape (a shutdown's, once its grace is over)."""
        for link in self.links.values():
            link.fail_all(status, code, message)

    def start(self) -> None:
        self._events = asyncio.create_task(self._watch_states())
        if self.name:  # so that the supervisor releases our leases if we die
            self.control.notify(ProcessHello(request_id=new_id(), name=self.name, pid=os.getpid()))

    async def _watch_states(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.linger = 0
        sub.connect(endpoints.metrics(self.run_dir))
        sub.setsockopt_string(zmq.SUBSCRIBE, endpoints.TOPIC_STATE + "worker/")
        sub.setsockopt_string(zmq.SUBSCRIBE, endpoints.TOPIC_STATE + "config/")
        last: dict[str, tuple[WorkerState, int]] = {}  # (the supervisor sends the states again to new subscribers)
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 2:
                    continue
                try:
                    event = EVENTS.decode(frames[1])
                except BusDecodeError:
                    continue
                if isinstance(event, ConfigReloaded):
                    for name in (*event.removed, *event.changed):  # (a removed model is served no more: its
                        self.invalidate(name)  # shared lease went on answering for it; a changed one restarts)
                    if self.on_config_reloaded is not None:
                        self.on_config_reloaded()
                    continue
                if not isinstance(event, WorkerStateEvent) or last.get(event.name) == (event.state, event.pid):
                    continue
                last[event.name] = (event.state, event.pid)
                if event.state != WorkerState.READY:
                    self.invalidate(event.name)
                    link = self.links.get(event.name)
                    if link is not None and event.state == WorkerState.STOPPING:  # (stopped: as the worker says it)
                        link.fail_all(503, "worker_stopping", f"model {event.name!r} is stopping")
                    elif link is not None and event.state != WorkerState.STARTING:
                        link.fail_all(502, "worker_" + event.state.value,
                                      f"model {event.name!r} worker {event.state.value}: {event.message}".rstrip(": "))
        finally:
            sub.close(0)

    async def acquire(self, model: str, keep_alive: float | None = None) -> WorkerEndpoint:
        """A READY worker of ``model``, leased under the reply's request_id until ``release``.

        Requests that leave keep-alive to the model share one supervisor lease per model while any of them runs
        (and for SHARED_LINGER_S after): the supervisor is asked once, not for every request."""
        if keep_alive is None:
            shared = self._shared.get(model)
            if shared is not None and shared.valid:
                shared.users += 1
                return shared.we
        we = await self._acquire_remote(model, keep_alive)
        if keep_alive is None and (model not in self._shared or not self._shared[model].valid):
            shared = _SharedLease(model, we)
            self._shared[model] = self._shared_by_lease[we.request_id] = shared
        return we

    async def _acquire_remote(self, model: str, keep_alive: float | None) -> WorkerEndpoint:
        lease = new_id()
        try:
            reply = await self.control.request(Acquire(request_id=lease, model=model, timeout_s=self.load_timeout,
                                                       keep_alive_s=keep_alive), self.load_timeout + 5)
        except ControlTimeout as exc:
            self.release(lease)
            raise ApiError(503, f"llama-runner supervisor unavailable: {exc}", code="unavailable") from None
        except BaseException:  # the client went away while the model was loading: let go of it
            self.release(lease)
            raise
        if isinstance(reply, ErrorReply):
            raise ApiError(reply.status, reply.message, code=reply.code)
        if not isinstance(reply, WorkerEndpoint):
            self.release(lease)
            raise ApiError(500, f"unexpected reply {type(reply).__name__}", code="internal")
        return reply

    def release(self, lease: str) -> None:
        shared = self._shared_by_lease.get(lease)
        if shared is None:
            self.control.notify(Release(request_id=new_id(), lease=lease))
            return
        shared.users -= 1
        if shared.users > 0:
            return
        if not shared.valid:
            self._drop(shared)
            return
        loop = asyncio.get_running_loop()
        shared.idle_since = loop.time()
        if shared.timer is None:
            shared.timer = loop.call_later(SHARED_LINGER_S, self._linger_over, shared)

    def _linger_over(self, shared: _SharedLease) -> None:
        shared.timer = None
        if shared.users > 0:  # in use: its next release arms the check again
            return
        loop = asyncio.get_running_loop()
        left = shared.idle_since + SHARED_LINGER_S - loop.time()
        if left > 0.001:  # used meanwhile: it lingers from its last release
            shared.timer = loop.call_later(left, self._linger_over, shared)
        else:
            self._drop(shared)

    def _retire(self, shared: _SharedLease) -> None:
        """No new request takes ``shared``; it is let go now if none uses it, else at its last release."""
        shared.valid = False
        if self._shared.get(shared.model) is shared:
            del self._shared[shared.model]
        if shared.users == 0:
            self._drop(shared)

    def _drop(self, shared: _SharedLease) -> None:
        shared.cancel_timer()
        shared.valid = False
        if self._shared.get(shared.model) is shared:
            del self._shared[shared.model]
        if self._shared_by_lease.pop(shared.we.request_id, None) is not None:
            self.control.notify(Release(request_id=new_id(), lease=shared.we.request_id))

    def invalidate(self, worker: str) -> None:
        """``worker`` left READY (or a job found it gone): new requests ask the supervisor again."""
        for shared in list(self._shared_by_lease.values()):
            if shared.we.model == worker and shared.valid:
                self._retire(shared)

    async def unload(self, model: str) -> None:
        """Ollama's ``keep_alive: 0``: the model unloads once the requests under way are done (theirs, and
        other clients'), at once when it has none."""
        if model in self._shared:  # (our own lingering lease would keep it loaded a while)
            self._retire(self._shared[model])
        reply = await self.control.request(StopWorker(request_id=new_id(), name=model, when_idle=True), 60)
        if isinstance(reply, ErrorReply):
            raise ApiError(reply.status, reply.message, code=reply.code)

    async def status(self, timeout: float = 5.0) -> StatusReply:
        """The supervisor's view of every worker (state, leases, expires_at, model file)."""
        try:
            reply = await self.control.request(Status(request_id=new_id()), timeout)
        except ControlTimeout as exc:
            raise ApiError(503, f"llama-runner supervisor unavailable: {exc}", code="unavailable") from None
        if isinstance(reply, ErrorReply):
            raise ApiError(reply.status, reply.message, code=reply.code)
        if not isinstance(reply, StatusReply):
            raise ApiError(500, f"unexpected reply {type(reply).__name__}", code="internal")
        return reply

    async def open(self, model: str, path: str, body: bytes, stream: bool,
                   keep_alive: float | None = None) -> Channel:
        """Acquire a worker for ``model`` and send it the job; returns the channel of its answer."""
        return await self.open_with(
            model, lambda rid: HttpJob(request_id=rid, path=path, body=body, stream=stream), keep_alive=keep_alive)

    async def open_with(self, model: str, make_job: Callable[[str], Job], kind: str | None = None,
                        keep_alive: float | None = None) -> Channel:
        """Like ``open`` for any Job: acquire a worker for ``model`` (of ``kind``, if given: else 400 and the
        lease is released), build the job with ``make_job(request_id)`` and send it (large binary frames
        are sent without a copy)."""
        we = await self.acquire(model, keep_alive)
        if kind is not None and we.kind != kind:
            self.release(we.request_id)
            raise ApiError(400, f"model {we.model!r} is a {we.kind} model, not a {kind} model",
                           code="wrong_model_type", param="model")
        link = self.links.get(we.model)
        if link is None or link.endpoint != we.endpoint:
            if link is not None:
                link.close()
            link = self.links[we.model] = WorkerLink(self.ctx, we.model, we.endpoint, self.load_timeout)
        rid = new_id()
        try:
            payload = JOBS.encode(make_job(rid))
        except BaseException:
            self.release(we.request_id)
            raise
        ch = Channel(rid, we.model, link, lease=we.request_id)
        link.channels[rid] = ch
        link.send(rid, payload)
        return ch

    async def close_channel(self, ch: Channel) -> None:
        """Forget a channel; if its stream did not finish, cancel it at the worker (frees the slot)."""
        ch.link.channels.pop(ch.request_id, None)
        ch.close()
        if not ch.finished:
            ch.link.send(ch.request_id, JOBS.encode(Cancel(request_id=ch.request_id)))
        if ch.lease:
            self.release(ch.lease)
            ch.lease = ""

    async def close(self) -> None:
        if self._events:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        for link in self.links.values():
            link.close()
        await self.control.close()
        if self._own_ctx:
            self.ctx.term()


def joined(items: Iterable[bytes]) -> bytes:
    return b"".join(items)
