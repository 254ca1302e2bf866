"""One owner task per worker: every change of a worker's state happens here, in order.

Others post events (acquire, start, stop, restart, hello, exited) and await futures; nobody reads the state
and then acts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from bus.protocol import WorkerHello, WorkerInfo, WorkerLaunch, WorkerState
from config.loader import model_file_problem
from supervisor import states
from supervisor.processes import kill_tree, python_module, spawn, terminate

S = WorkerState
log = structlog.get_logger()
# A failed worker's last hello (its reason) and its exit race: half the failed loads said "worker exited with
# code 3" instead of why. Its exit is acted on this much later.
EXIT_GRACE_S = 0.1


# A load that failed is Ollama's 500 (it was a 503 with Retry-After: the openai client tried the load three times);
# the gateways add `x-should-retry: false` (the openai client's own header) to it.
LOAD_FAILED = 500


def missing_model(launch: WorkerLaunch) -> str:
    """Why ``launch``'s model cannot load because its file (a whisper model: its folder) is not there, or ""."""
    path = launch.model_path
    if launch.kind == "whisper":
        return "" if os.path.isdir(path) else f"whisper model directory not found: {path}"
    return model_file_problem(path)


class WorkerUnavailable(Exception):
    def __init__(self, code: str, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass
class Policy:
    grace_s: float = 5.0
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    max_failures: int = 5
    # A worker that crashes within this long of becoming ready counts a failure in a row (its llama-server killed
    # at every first request, by the OOM killer say): only a run this long starts the count again.
    stable_s: float = 30.0


@dataclass
class _Event:
    kind: str
    fut: asyncio.Future[Any] | None = None
    generation: int = 0
    payload: Any = None


@dataclass
class WorkerManager:
    launch: WorkerLaunch
    policy: Policy
    publish: Callable[[WorkerInfo], None]
    log_path: Any
    state: WorkerState = S.STOPPED
    endpoint: str = ""
    pid: int = 0
    backend_pid: int = 0
    restarts: int = 0
    failures: int = 0
    ready_at: float = 0.0  # when the running worker became ready (0: not ready)
    message: str = ""
    started_at: float = 0.0
    last_used: float = 0.0
    _inbox: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    _proc: asyncio.subprocess.Process | None = None
    _generation: int = 0
    _waiters: list[asyncio.Future[str]] = field(default_factory=list)
    _stop_futs: list[asyncio.Future[Any]] = field(default_factory=list)
    _pending_start: bool = False
    # Started by an operator or a preload (not by a request): a failed load is retried with backoff. A load a
    # request asked for is not retried once that request had its error: the next request tries again.
    _keep_up: bool = False
    # Why the worker is exiting, from its last hello: shown once its exit is acted on (shown at once, a
    # READY worker read "llama-server exited unexpectedly" without its state or what happens next)
    _last_words: str = ""
    _timer: asyncio.TimerHandle | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    task: asyncio.Task[Any] | None = None  # the owner task (set by the supervisor)

    @property
    def name(self) -> str:
        return self.launch.name

    # ------------------------------------------------------------------ API (any task)
    def _post(self, kind: str, **kw: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Event(kind, fut, **kw))
        return fut

    def acquire(self) -> asyncio.Future[str]:
        """Resolves to the worker's endpoint once READY (starting it if needed)."""
        return self._post("acquire")

    def start(self) -> asyncio.Future[Any]:
        return self._post("start")

    def stop(self) -> asyncio.Future[Any]:
        """Resolves once STOPPED (idempotent)."""
        return self._post("stop")

    def restart(self, keep_up: bool = True) -> asyncio.Future[Any]:
        """Stop and start again; ``keep_up``: an operator wants it up (a failed load is retried with backoff);
        False: as it was (a reload applying new settings)."""
        return self._post("restart", payload=keep_up)

    def hello(self, msg: WorkerHello) -> None:
        self._inbox.put_nowait(_Event("hello", payload=msg))

    def load_refused(self, reason: str) -> None:
        """A load was refused before a worker was started (its model file is missing): said where the operator
        looks, as a failed load is."""
        self._inbox.put_nowait(_Event("load_refused", payload=reason))

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            name=self.name, kind=self.launch.kind, state=self.state, pid=self.pid, backend_pid=self.backend_pid,
            endpoint=self.endpoint, restarts=self.restarts, started_at=self.started_at,
            last_used=self.last_used, message=self.message,
        )

    # ------------------------------------------------------------------ owner loop
    async def run(self) -> None:
        while True:
            ev = await self._inbox.get()
            try:
                await getattr(self, f"_on_{ev.kind}")(ev)
            except Exception:
                log.exception("worker_event_failed", worker=self.name, event=ev.kind)
                if ev.fut and not ev.fut.done():
                    ev.fut.set_exception(WorkerUnavailable("internal", "internal supervisor error", 500))

    def _set(self, new: WorkerState, message: str | None = None) -> None:
        if new == self.state:
            return
        states.check(self.state, new)
        log.info("worker_state", worker=self.name, old=self.state.value, new=new.value, message=message or "")
        self.state = new
        if message is not None:
            self.message = message
        self.publish(self.info())

    @staticmethod
    def _resolve(fut: asyncio.Future[Any] | None, value: Any = None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _reject_waiters(self, exc: WorkerUnavailable) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(exc)

    async def _on_acquire(self, ev: _Event) -> None:
        assert ev.fut is not None
        self.last_used = time.time()
        if self.state == S.READY:
            self._resolve(ev.fut, self.endpoint)
        elif self.state == S.FATAL:
            ev.fut.set_exception(WorkerUnavailable(
                "load_failed", f"model {self.name!r} failed to start: {self.message}; once it is fixed, start it "
                f"again: `llama-runner start {self.name}` or the dashboard", LOAD_FAILED))
        else:
            self._waiters.append(ev.fut)
            if self.state == S.STOPPING:
                self._pending_start = True
            elif self.state == S.STOPPED:
                await self._spawn()

    async def _on_start(self, ev: _Event) -> None:
        self._keep_up = True
        if self.state in (S.STOPPED, S.FATAL, S.BACKOFF):
            self.failures = 0
            await self._spawn()
        elif self.state == S.STOPPING:
            self._pending_start = True
        self._resolve(ev.fut, self.state.value)

    async def _on_stop(self, ev: _Event) -> None:
        self._pending_start = self._keep_up = False
        self._reject_waiters(WorkerUnavailable("stopped", f"model {self.name!r} was stopped", 503))
        if self.state in (S.STARTING, S.READY):
            self._stop_futs.append(ev.fut)  # type: ignore[arg-type]
            self._begin_stop()
        elif self.state == S.STOPPING:
            self._stop_futs.append(ev.fut)  # type: ignore[arg-type]
        else:
            self._cancel_timer()
            if self.state != S.STOPPED:
                self._set(S.STOPPED)
            self._resolve(ev.fut, "stopped")

    async def _on_restart(self, ev: _Event) -> None:
        self.failures = 0
        self._keep_up = self._keep_up or bool(ev.payload)
        if self.state in (S.STARTING, S.READY):
            self._pending_start = True
            self._begin_stop()
        elif self.state == S.STOPPING:
            self._pending_start = True
        else:
            self._cancel_timer()
            await self._spawn()
        self._resolve(ev.fut, "restarting")

    async def _on_hello(self, ev: _Event) -> None:
        msg: WorkerHello = ev.payload
        if self._proc is None or msg.pid != self._proc.pid:
            return
        if msg.backend_pid:
            self.backend_pid = msg.backend_pid
        if msg.state == S.READY and self.state == S.STARTING:
            self.endpoint = msg.endpoint
            self.ready_at = time.monotonic()
            self._set(S.READY, "")
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                self._resolve(fut, self.endpoint)
        elif msg.state == S.FATAL:
            self._last_words = msg.message  # the process exits next; _on_exited acts on it

    async def _on_load_refused(self, ev: _Event) -> None:
        if self.state in (S.STOPPED, S.FATAL):
            self.message = f"failed to load: {ev.payload}"
            self.publish(self.info())

    async def _on_exited(self, ev: _Event) -> None:
        if ev.generation != self._generation:
            return
        code = ev.payload
        self._proc = None
        if self.backend_pid:
            kill_tree(self.backend_pid)  # never leave a llama-server behind its dead worker
        if self.pid and self.launch.run_dir:  # (a worker killed leaves its llama-server's key file)
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.launch.run_dir, f"k-{self.pid}.key"))
        self.pid = self.backend_pid = 0
        self.endpoint = ""
        ready_at, self.ready_at = self.ready_at, 0.0
        if self.state == S.STOPPING:
            self.failures = 0  # (a clean stop, an unload or an eviction, ends a row of crashes)
            self._set(S.STOPPED, "")
            futs, self._stop_futs = self._stop_futs, []
            for fut in futs:
                self._resolve(fut, "stopped")
            if self._pending_start:
                self._pending_start = False
                await self._spawn()
            return
        # a crash (or a failed start)
        was = self.state
        if ready_at and time.monotonic() - ready_at >= self.policy.stable_s:
            self.failures = 0  # (it ran long enough: this crash is the first in a row)
        reason = self._last_words or f"worker exited with code {code}"  # (a worker says why in its last hello)
        if was == S.STARTING:
            self._reject_waiters(WorkerUnavailable("load_failed", f"model {self.name!r} failed to load: {reason}",
                                                    LOAD_FAILED))
            if not self._keep_up:  # its requests had their error; the next one tries again (as Ollama does)
                self._set(S.STOPPED, f"failed to load: {reason}")
                return
        self.failures += 1
        self.restarts += 1
        if self.failures >= self.policy.max_failures:
            self._set(S.FATAL, f"{reason} ({self.failures} failures in a row)")
            self._reject_waiters(WorkerUnavailable("load_failed", f"model {self.name!r} failed: {self.message}",
                                                    LOAD_FAILED))
            return
        delay = states.backoff_delay(self.failures, self.policy.backoff_s, self.policy.backoff_max_s)
        self._set(S.BACKOFF, f"{reason}; restarting in {delay:.1f}s")
        gen = self._generation
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, lambda: self._inbox.put_nowait(_Event("backoff_done", generation=gen)))

    async def _on_backoff_done(self, ev: _Event) -> None:
        self._timer = None
        if ev.generation == self._generation and self.state == S.BACKOFF:
            await self._spawn()


    # ------------------------------------------------------------------ process handling
    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _spawn(self) -> None:
        self._cancel_timer()
        self._set(S.STARTING, "")
        self._last_words = ""
        self._generation += 1
        gen = self._generation
        argv = python_module("workers", msgspec.json.encode(self.launch).decode())
        try:
            self._proc = await spawn(argv, self.log_path)
        except OSError as exc:
            self._last_words = f"cannot spawn worker: {exc}"
            self._inbox.put_nowait(_Event("exited", generation=gen, payload=-1))
            return
        self.pid = self._proc.pid
        self.started_at = time.time()
        self.publish(self.info())
        proc = self._proc
        self._track(self._watch(proc, gen))

    def _track(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, proc: asyncio.subprocess.Process, gen: int) -> None:
        code = await proc.wait()
        if code != 0:  # a worker that failed said why just before it exited: that hello is taken first
            await asyncio.sleep(EXIT_GRACE_S)
        self._inbox.put_nowait(_Event("exited", generation=gen, payload=code))

    def _begin_stop(self) -> None:
        self._set(S.STOPPING)
        proc = self._proc
        if proc is None:
            return
        grace = self.policy.grace_s

        async def _term() -> None:
            with contextlib.suppress(Exception):
                await terminate(proc, grace)

        self._track(_term())
