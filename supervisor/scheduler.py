"""Residency: which models are loaded. One owner task decides; workers' own managers carry it out.

- Every Acquire is a lease: a worker with a lease is busy and is never evicted.
- When a model must start and ``max_loaded_models`` are loaded (or, with a memory budget, its estimated
  footprint does not fit beside the loaded ones), the least recently used *idle* worker is stopped first;
  with none idle, the request waits (its caller's timeout bounds the wait).
- After its last lease, a worker stays loaded for its keep-alive (the request's, else the model's idle TTL;
  0 unloads at once; negative keeps it), then is stopped.
- A lease released before its model finished loading (the client went away) stops that load when no one
  else wants the model.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.protocol import WorkerState
from supervisor.worker_manager import WorkerManager, WorkerUnavailable

S = WorkerState
log = structlog.get_logger()
LOADED = frozenset({S.STARTING, S.READY, S.STOPPING, S.BACKOFF})  # (backoff: it restarts by itself)
FOREVER = -1.0


@dataclass
class _Pending:
    lease: str
    mgr: WorkerManager
    fut: asyncio.Future[str]
    begin: Callable[[], asyncio.Future[Any]] | None = None  # an operator's start / restart (else: an acquire)


@dataclass
class Scheduler:
    managers: dict[str, WorkerManager]
    max_loaded: int
    default_ttl: Callable[[str], float]  # model name -> idle TTL in seconds (0: unload when idle, <0: never)
    max_keep_alive: float | None = None  # the server's cap on what a client may ask for
    memory_budget: int | None = None  # bytes all loaded models may take together (None: no budget)
    footprint: Callable[[str], int] = lambda name: 0  # model name -> estimated bytes when loaded
    _inbox: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    _leases: dict[str, str] = field(default_factory=dict)  # lease -> model
    _granted: dict[str, asyncio.Future[str]] = field(default_factory=dict)  # lease -> its acquire future
    _count: Counter[str] = field(default_factory=Counter)
    _keep_alive: dict[str, float] = field(default_factory=dict)
    _expires: dict[str, float] = field(default_factory=dict)
    _timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    _pending: list[_Pending] = field(default_factory=list)
    _owners: dict[str, bytes] = field(default_factory=dict)  # lease -> control socket identity of its holder
    # Loads and stops asked of managers that their state does not show yet (a manager acts on its own task, later):
    # counted as loaded / stopping meanwhile. Without them, requests for several models arriving together all saw
    # the same free room (three models loaded under a cap of 2) and chose the same victim.
    _launching: set[str] = field(default_factory=set)
    _evicting: set[str] = field(default_factory=set)

    # ------------------------------------------------------------------ API (any task)
    def acquire(self, lease: str, name: str, keep_alive: float | None, owner: bytes = b"") -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if owner:
            self._owners[lease] = owner
        self._inbox.put_nowait(("acquire", (lease, name, keep_alive, fut)))
        return fut

    def start(self, name: str, restart: bool = False) -> asyncio.Future[str]:
        """An operator's (or a preload's) start or restart of ``name``, within ``max_loaded_models`` and the
        memory budget as a request's load is: an idle model makes room; with every loaded model busy it is
        refused (WorkerUnavailable 409). Resolves once the start is under way."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(("start", (name, restart, fut)))
        return fut

    def release_owner(self, owner: bytes) -> None:
        """Release every lease of a process that died (it will never release them itself)."""
        for lease in [lease for lease, o in self._owners.items() if o == owner]:
            self.release(lease)

    def release(self, lease: str) -> None:
        self._inbox.put_nowait(("release", lease))

    def unload_when_idle(self, name: str) -> asyncio.Future[asyncio.Future[Any] | None]:
        """Unload ``name`` once its leases are released (Ollama's ``keep_alive: 0``: the requests under way
        finish first). Resolves to the stop under way (now idle: stopped at once), or None (deferred)."""
        fut: asyncio.Future[asyncio.Future[Any] | None] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(("unload", (name, fut)))
        return fut

    def worker_changed(self, name: str) -> None:
        self._inbox.put_nowait(("changed", name))

    def leases(self, name: str) -> int:
        return self._count[name]

    def expires_at(self, name: str) -> float:
        """Unix time when the model unloads if no request comes (while busy: its keep-alive from now); -1 when
        it is kept loaded (a negative keep-alive); 0 when nothing is scheduled (not loaded)."""
        if name in self._expires:
            return self._expires[name]
        mgr = self.managers.get(name)
        if mgr is None or not self._is_loaded(mgr):
            return 0.0
        ka = self._keep_alive.get(name, 0.0)
        if ka < 0:
            return FOREVER  # (kept loaded: -1)
        return time.time() + ka if self._count[name] > 0 and ka > 0 else 0.0

    def clamp(self, keep_alive: float | None, name: str) -> float:
        """The keep-alive a request asked for, within the server's cap; none asked: the model's own (the
        operator's idle TTL is not capped: the cap is on what clients may ask for)."""
        if keep_alive is None:
            return self.default_ttl(name)
        value = keep_alive
        cap = self.max_keep_alive
        if cap is not None and cap >= 0 and (value < 0 or value > cap):
            value = cap
        return value

    # ------------------------------------------------------------------ owner loop
    async def run(self) -> None:
        while True:
            kind, arg = await self._inbox.get()
            try:
                getattr(self, f"_on_{kind}")(arg)
            except Exception:
                log.exception("scheduler_event_failed", event=kind)

    def _on_acquire(self, arg: tuple[str, str, float | None, asyncio.Future[str]]) -> None:
        lease, name, keep_alive, fut = arg
        log.debug("acquire", lease=lease, worker=name, keep_alive=keep_alive)
        mgr = self.managers[name]
        self._leases[lease] = name
        self._granted[lease] = fut
        self._count[name] += 1
        self._keep_alive[name] = self.clamp(keep_alive, name)
        self._cancel_timer(name)
        self._expires.pop(name, None)  # (busy: it expires its keep-alive after the last release, see expires_at)
        self._try(_Pending(lease, mgr, fut))

    def _on_start(self, arg: tuple[str, bool, asyncio.Future[str]]) -> None:
        name, restart, fut = arg
        mgr = self.managers[name]
        self._try(_Pending("", mgr, fut, mgr.restart if restart else mgr.start))

    def _try(self, p: _Pending) -> bool:
        """Grant now if the model is loaded or there is room; else make room (evict) and wait."""
        name = p.mgr.name
        loaded = p.mgr.state in LOADED if p.begin is not None else p.mgr.state != S.STOPPED
        if loaded or name in self._launching or self._fits(name):
            if not loaded:
                self._launching.add(name)
            fut = p.begin() if p.begin is not None else p.mgr.acquire()
            fut.add_done_callback(lambda _: self._settled(self._launching, name))
            self._chain(fut, p.fut)
            return True
        if not self._evicting and not any(m.state == S.STOPPING for m in self.managers.values()):
            victim = self._victim(exclude=name)
            if victim is not None:
                log.info("evict", worker=victim.name, for_model=name)
                self._evicting.add(victim.name)
                victim.stop().add_done_callback(lambda _: self._settled(self._evicting, victim.name))
            elif p.begin is not None:  # (an operator's start does not wait for a request to finish)
                p.fut.set_exception(WorkerUnavailable(
                    "no_room", f"cannot start {p.mgr.name!r}: {self._loaded()} model(s) loaded "
                    f"(limits.max_loaded_models {self.max_loaded}"
                    f"{', or the memory budget' if self.memory_budget is not None else ''}), each serving a "
                    "request; stop one, or try again once one is idle", 409))
                return False
        if p not in self._pending:
            self._pending.append(p)
        return False

    def _settled(self, pending: set[str], name: str) -> None:
        """A load or stop asked of ``name``'s manager is done (its state shows it now): room is looked at again."""
        pending.discard(name)
        self._inbox.put_nowait(("changed", name))

    def _victim(self, exclude: str) -> WorkerManager | None:
        idle = [m for m in self.managers.values()
                if m.name != exclude and m.name not in self._launching and m.name not in self._evicting
                and m.state in (S.READY, S.BACKOFF, S.STARTING) and self._count[m.name] == 0]
        return min(idle, key=lambda m: m.last_used, default=None)

    def _is_loaded(self, m: WorkerManager) -> bool:
        return m.state in LOADED or m.name in self._launching or m.name in self._evicting

    def _loaded(self) -> int:
        return sum(1 for m in self.managers.values() if self._is_loaded(m))

    def _fits(self, name: str) -> bool:
        if self._loaded() >= self.max_loaded:
            return False
        if self.memory_budget is None:
            return True
        used = sum(self.footprint(m.name) for m in self.managers.values() if self._is_loaded(m))
        # a model larger than the whole budget still loads when nothing else is loaded
        return used == 0 or used + self.footprint(name) <= self.memory_budget

    @staticmethod
    def _chain(src: asyncio.Future[str], dst: asyncio.Future[str]) -> None:
        def done(f: asyncio.Future[str]) -> None:
            exc = None if f.cancelled() else f.exception()  # (retrieved even when nobody waits any more)
            if dst.done():
                return
            if f.cancelled():
                dst.cancel()
            elif exc is not None:
                dst.set_exception(exc)
            else:
                dst.set_result(f.result())

        src.add_done_callback(done)

    def _on_release(self, lease: str) -> None:
        name = self._leases.pop(lease, None)
        fut = self._granted.pop(lease, None)
        self._owners.pop(lease, None)
        log.debug("release", lease=lease, worker=name)
        if name is None:
            return
        mgr = self.managers[name]
        self._count[name] -= 1
        mgr.last_used = time.time()
        for p in [p for p in self._pending if p.lease == lease]:
            self._pending.remove(p)
        abandoned = fut is not None and not fut.done()
        if fut is not None and abandoned:
            fut.set_exception(WorkerUnavailable("cancelled", "request went away", 499))
            fut.exception()  # retrieved here: nobody may be waiting for it any more
        if self._count[name] > 0:
            return
        del self._count[name]
        if mgr.state == S.STARTING and abandoned:
            log.info("load_abandoned", worker=name)
            mgr.stop()
        self._arm_idle(mgr)
        self._retry()

    def _arm_idle(self, mgr: WorkerManager) -> None:
        name = mgr.name
        self._cancel_timer(name)
        if self._count[name] > 0 or mgr.state not in (S.READY, S.STARTING):
            self._expires.pop(name, None)
            return
        ka = self._keep_alive.get(name, self.clamp(None, name))
        if ka == 0:
            self._expires.pop(name, None)
            mgr.stop()
        elif ka < 0:
            self._expires.pop(name, None)
        else:
            self._expires[name] = time.time() + ka
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(ka, lambda: self._inbox.put_nowait(("idle", name)))

    def _on_unload(self, arg: tuple[str, asyncio.Future[asyncio.Future[Any] | None]]) -> None:
        name, fut = arg
        mgr = self.managers[name]
        if self._count[name] > 0:
            log.info("unload_when_idle", worker=name, leases=self._count[name])
            self._keep_alive[name] = 0.0  # the last release stops it (_arm_idle); a new request's keep-alive wins
            fut.set_result(None)
            return
        self._cancel_timer(name)
        self._expires.pop(name, None)
        fut.set_result(mgr.stop())

    def _on_idle(self, name: str) -> None:
        self._timers.pop(name, None)
        mgr = self.managers[name]
        if self._count[name] == 0 and mgr.state in (S.READY, S.STARTING, S.BACKOFF):
            log.info("idle_unload", worker=name)
            self._expires.pop(name, None)
            mgr.stop()

    def _on_changed(self, name: str) -> None:
        mgr = self.managers.get(name)
        if mgr is None:
            return
        if mgr.state == S.READY and self._count[name] == 0 and name not in self._timers:
            self._arm_idle(mgr)  # started by an operator or a preload: it unloads when idle too
        elif mgr.state in (S.STOPPED, S.FATAL):
            self._cancel_timer(name)
            self._expires.pop(name, None)
        self._retry()

    def refuse_waiting(self, error: WorkerUnavailable, name: str | None = None) -> None:
        """Every request waiting for room (for model ``name``, or any) gets ``error`` now: a shutdown (nothing loads
        any more, and they got no answer at all: their clients' connections were dropped), or an operator's stop
        of that model (it loaded anyway for them once room was made, and stayed: "stopped" did not hold)."""
        refused = [p for p in self._pending if name is None or p.mgr.name == name]
        self._pending = [p for p in self._pending if p not in refused]
        for p in refused:
            if not p.fut.done():
                p.fut.set_exception(error)

    def _retry(self) -> None:
        pending, self._pending = self._pending, []
        for p in pending:
            if p.fut.done():
                continue
            self._try(p)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
