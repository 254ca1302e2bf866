"""Residency decisions, against stand-in workers (the real lifecycle is covered by tests/e2e)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bus.protocol import WorkerState as S
from supervisor.scheduler import Scheduler


class FakeWorker:
    """Stands in for a WorkerManager: state changes when the test says so."""

    def __init__(self, name: str, sched: list[Scheduler]) -> None:
        self.name = name
        self.state = S.STOPPED
        self.last_used = 0.0
        self.stops = 0
        self.starts = 0
        self._stopped: list[asyncio.Future[str]] = []
        self._waiters: list[asyncio.Future[str]] = []
        self._sched = sched

    def acquire(self) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.state == S.READY:
            fut.set_result(f"ep-{self.name}")
        else:
            self._waiters.append(fut)
            if self.state == S.STOPPED:
                self.state = S.STARTING
        return fut

    def start(self) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.starts += 1
        if self.state in (S.STOPPED, S.FATAL, S.BACKOFF):
            self.state = S.STARTING
        fut.set_result(self.state.value)
        return fut

    restart = start

    def become_ready(self) -> None:
        self.state = S.READY
        for f in self._waiters:
            f.set_result(f"ep-{self.name}")
        self._waiters.clear()
        self._sched[0].worker_changed(self.name)

    def stop(self) -> asyncio.Future[str]:
        self.stops += 1
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.state in (S.READY, S.STARTING):
            self.state = S.STOPPING
            self._stopped.append(fut)
        else:
            if self.state == S.BACKOFF:  # (its restart is called off)
                self.state = S.STOPPED
            fut.set_result("stopped")
        return fut

    def finish_stop(self) -> None:
        self.state = S.STOPPED
        for fut in self._stopped:
            fut.set_result("stopped")
        self._stopped.clear()
        self._sched[0].worker_changed(self.name)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def world() -> Any:
    ref: list[Scheduler] = []
    workers = {n: FakeWorker(n, ref) for n in ("a", "b", "c")}
    ttl = {"a": 60.0, "b": 60.0, "c": 60.0}
    sched = Scheduler(workers, max_loaded=2, default_ttl=lambda n: ttl[n])  # type: ignore[arg-type]
    ref.append(sched)
    task = asyncio.create_task(sched.run())
    yield sched, workers, ttl
    task.cancel()


async def load(sched: Scheduler, w: FakeWorker, lease: str, keep_alive: float | None = None) -> str:
    fut = sched.acquire(lease, w.name, keep_alive)
    await settle()
    if w.state == S.STARTING:
        w.become_ready()
    return await asyncio.wait_for(fut, 1)


async def test_evicts_least_recently_used_idle_worker(world: Any) -> None:
    sched, w, _ = world
    await load(sched, w["a"], "1")
    await load(sched, w["b"], "2")
    w["a"].last_used, w["b"].last_used = 100.0, 50.0
    sched.release("1")
    sched.release("2")
    await settle()
    w["a"].last_used, w["b"].last_used = 100.0, 50.0  # b is the least recently used
    fut = sched.acquire("3", "c", None)
    await settle()
    assert w["b"].state == S.STOPPING and w["a"].state == S.READY and not fut.done()
    w["b"].finish_stop()
    await settle()
    assert w["c"].state == S.STARTING
    w["c"].become_ready()
    assert await asyncio.wait_for(fut, 1) == "ep-c"


async def test_a_crashed_model_waiting_to_restart_keeps_its_room(world: Any) -> None:
    """A model in backoff restarts by itself: it counted as not loaded, so another loaded in its room and then
    one model more than max_loaded_models ran once it was back."""
    sched, w, _ = world  # (max_loaded 2)
    await load(sched, w["a"], "1")
    await load(sched, w["b"], "2")
    sched.release("1")
    sched.release("2")
    await settle()
    w["a"].last_used, w["b"].last_used = 10.0, 50.0
    w["a"].state = S.BACKOFF  # (crashed: it restarts after its backoff)
    sched.worker_changed("a")
    await settle()
    fut = sched.acquire("3", "c", None)
    await settle()
    assert w["a"].stops == 1 and w["a"].state == S.STOPPED, "the idle crashed model makes the room"
    assert w["c"].state == S.STARTING and w["b"].state == S.READY
    w["c"].become_ready()
    assert await asyncio.wait_for(fut, 1) == "ep-c"


async def test_a_model_kept_loaded_and_then_stopped_expires_nowhere(world: Any) -> None:
    """It said -1 ("kept loaded") once stopped."""
    sched, w, _ = world
    await load(sched, w["a"], "1", keep_alive=-1)
    sched.release("1")
    await settle()
    assert sched.expires_at("a") == -1
    w["a"].stop()
    w["a"].finish_stop()
    await settle()
    assert sched.expires_at("a") == 0


async def test_busy_worker_is_never_evicted_request_waits(world: Any) -> None:
    sched, w, _ = world
    await load(sched, w["a"], "1")
    await load(sched, w["b"], "2")  # both hold leases: busy
    fut = sched.acquire("3", "c", None)
    await settle()
    assert w["a"].stops == 0 and w["b"].stops == 0 and w["c"].state == S.STOPPED and not fut.done()
    sched.release("1")  # a becomes idle: now it can make room
    await settle()
    assert w["a"].state == S.STOPPING and w["b"].stops == 0
    w["a"].finish_stop()
    await settle()
    w["c"].become_ready()
    assert await asyncio.wait_for(fut, 1) == "ep-c"


async def test_keep_alive_zero_unloads_after_last_lease(world: Any) -> None:
    sched, w, _ = world
    await load(sched, w["a"], "1", keep_alive=0)
    await load(sched, w["a"], "2", keep_alive=0)
    sched.release("1")
    await settle()
    assert w["a"].stops == 0  # still one lease
    sched.release("2")
    await settle()
    assert w["a"].stops == 1


async def test_an_unload_waits_for_the_requests_under_way(world: Any) -> None:
    """Ollama's keep_alive 0 from one client: another client's request under way finishes first."""
    sched, w, _ = world
    await load(sched, w["a"], "1")
    assert await asyncio.wait_for(sched.unload_when_idle("a"), 1) is None  # deferred: a lease is held
    await settle()
    assert w["a"].stops == 0 and w["a"].state == S.READY
    sched.release("1")
    await settle()
    assert w["a"].stops == 1  # its last request done: unloaded at once, not after its 60 s idle TTL
    # with nothing under way it stops now
    await load(sched, w["b"], "2")
    sched.release("2")
    await settle()
    await asyncio.wait_for(sched.unload_when_idle("b"), 1)
    assert w["b"].stops == 1


async def test_a_request_after_an_unload_keeps_its_own_keep_alive(world: Any) -> None:
    sched, w, _ = world
    await load(sched, w["a"], "1")
    await asyncio.wait_for(sched.unload_when_idle("a"), 1)
    await load(sched, w["a"], "2")  # a new request (the model's 60 s TTL) before the first one ended
    sched.release("1")
    sched.release("2")
    await settle()
    assert w["a"].stops == 0 and sched.expires_at("a") > 0


async def test_idle_ttl_unloads_and_negative_keeps(world: Any) -> None:
    sched, w, ttl = world
    ttl["a"] = 0.05
    await load(sched, w["a"], "1")
    sched.release("1")
    await settle()
    assert sched.expires_at("a") > 0
    await asyncio.sleep(0.15)
    assert w["a"].stops == 1
    await load(sched, w["b"], "2", keep_alive=-1)
    sched.release("2")
    await asyncio.sleep(0.1)
    assert w["b"].stops == 0 and sched.expires_at("b") == -1  # kept loaded (/api/ps: a far-future date)
    # a request that asks to keep a model loaded: so while it runs too (not the expiry of its last idle time)
    w["a"].finish_stop()
    await load(sched, w["a"], "3", keep_alive=60)
    sched.release("3")
    await settle()
    assert sched.expires_at("a") > 0
    await load(sched, w["a"], "4", keep_alive=-1)
    assert sched.expires_at("a") == -1


async def test_server_cap_wins_over_client_keep_alive() -> None:
    sched = Scheduler({}, max_loaded=1, default_ttl=lambda n: 300.0, max_keep_alive=600.0)
    assert sched.clamp(-1, "x") == 600.0
    assert sched.clamp(3600, "x") == 600.0
    assert sched.clamp(10, "x") == 10
    assert sched.clamp(None, "x") == 300.0


async def test_the_cap_is_on_clients_not_on_the_operators_idle_ttl() -> None:
    ttl = {"long": 900.0, "kept": -1.0}
    sched = Scheduler({}, max_loaded=1, default_ttl=lambda n: ttl[n], max_keep_alive=3.0)
    assert sched.clamp(None, "long") == 900.0  # (was 3: the model's own idle_ttl_s capped too)
    assert sched.clamp(None, "kept") == -1.0


async def test_an_operators_start_makes_room_as_a_request_does(world: Any) -> None:
    sched, w, _ = world
    await load(sched, w["a"], "1")
    await load(sched, w["b"], "2")
    sched.release("1")
    await settle()
    fut = sched.start("c")  # two loaded (the cap): the idle one makes room first (all three were loaded)
    await settle()
    assert w["a"].state == S.STOPPING and w["c"].state == S.STOPPED and w["c"].starts == 0 and not fut.done()
    w["a"].finish_stop()
    await settle()
    assert w["c"].state == S.STARTING and await asyncio.wait_for(fut, 1) == "starting"
    assert w["b"].stops == 0


async def test_an_operators_start_with_every_loaded_model_busy_is_refused(world: Any) -> None:
    from supervisor.worker_manager import WorkerUnavailable

    sched, w, _ = world
    await load(sched, w["a"], "1")
    await load(sched, w["b"], "2")
    with pytest.raises(WorkerUnavailable) as err:
        await asyncio.wait_for(sched.start("c"), 1)
    assert err.value.status == 409 and "max_loaded_models 2" in err.value.message
    assert w["c"].state == S.STOPPED and w["a"].stops == w["b"].stops == 0
    assert await asyncio.wait_for(sched.start("a", restart=True), 1) == "ready"  # a loaded one: no room needed


async def test_client_gone_during_load_stops_the_load(world: Any) -> None:
    sched, w, _ = world
    fut = sched.acquire("1", "a", None)
    await settle()
    assert w["a"].state == S.STARTING
    sched.release("1")
    await settle()
    assert w["a"].stops == 1 and fut.done()


async def test_a_load_failing_after_its_client_left_logs_no_unretrieved_error(world: Any) -> None:
    import gc

    from supervisor.worker_manager import WorkerUnavailable

    sched, w, _ = world
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        sched.acquire("1", "a", None)
        await settle()
        sched.release("1")  # the client went away while "a" loads
        await settle()
        for waiter in w["a"]._waiters:  # then the load fails
            waiter.set_exception(WorkerUnavailable("load_failed", "boom", 503))
        w["a"]._waiters.clear()
        del waiter
        await settle()
        gc.collect()
        await settle()
        assert not [e for e in errors if "never retrieved" in str(e.get("message"))]
    finally:
        loop.set_exception_handler(None)


async def test_unknown_release_is_ignored(world: Any) -> None:
    sched, w, _ = world
    sched.release("nope")
    await load(sched, w["a"], "1")
    assert sched.leases("a") == 1


async def test_memory_budget_evicts_to_make_room() -> None:
    ref: list[Scheduler] = []
    workers = {n: FakeWorker(n, ref) for n in ("a", "b", "c")}
    sizes = {"a": 600, "b": 300, "c": 500}
    sched = Scheduler(workers, max_loaded=3, default_ttl=lambda n: 60.0,  # type: ignore[arg-type]
                      memory_budget=1000, footprint=lambda n: sizes[n])
    ref.append(sched)
    task = asyncio.create_task(sched.run())
    try:
        await load(sched, workers["a"], "1")
        await load(sched, workers["b"], "2")  # 900 of 1000
        sched.release("1")
        sched.release("2")
        await settle()
        workers["a"].last_used, workers["b"].last_used = 10.0, 20.0
        fut = sched.acquire("3", "c", None)  # 500 does not fit: evict a (LRU), then 300 + 500 fits
        await settle()
        assert workers["a"].state == S.STOPPING and workers["b"].state == S.READY
        workers["a"].finish_stop()
        await settle()
        workers["c"].become_ready()
        assert await asyncio.wait_for(fut, 1) == "ep-c"
    finally:
        task.cancel()


async def test_a_model_larger_than_the_budget_loads_alone() -> None:
    ref: list[Scheduler] = []
    workers = {"big": FakeWorker("big", ref)}
    sched = Scheduler(workers, max_loaded=2, default_ttl=lambda n: 60.0,  # type: ignore[arg-type]
                      memory_budget=10, footprint=lambda n: 100)
    ref.append(sched)
    task = asyncio.create_task(sched.run())
    try:
        assert await load(sched, workers["big"], "1") == "ep-big"
    finally:
        task.cancel()


async def test_expiry_of_a_busy_model_is_its_keep_alive_from_now(world: Any) -> None:
    sched, w, _ = world
    await load(sched, w["a"], "1", keep_alive=600)
    import time as _time

    assert 599 < sched.expires_at("a") - _time.time() <= 600
    assert sched.expires_at("b") == 0.0


class LazyWorker(FakeWorker):
    """A manager as the real one: a load or stop asked of it shows in its state only once its own task has run."""

    def acquire(self) -> asyncio.Future[str]:
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if self.state == S.READY:
            fut.set_result(f"ep-{self.name}")
            return fut
        self._waiters.append(fut)

        def later() -> None:
            if self.state == S.STOPPED:
                self.state = S.STARTING
                self._sched[0].worker_changed(self.name)

        asyncio.get_running_loop().call_later(0.01, later)
        return fut

    def stop(self) -> asyncio.Future[str]:
        self.stops += 1
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._stopped.append(fut)

        def later() -> None:
            if self.state in (S.READY, S.STARTING):
                self.state = S.STOPPING
                self._sched[0].worker_changed(self.name)
            elif self.state == S.STOPPED:
                for f in self._stopped:
                    f.set_result("stopped")
                self._stopped.clear()

        asyncio.get_running_loop().call_later(0.01, later)
        return fut


async def test_requests_for_several_models_at_once_stay_within_the_cap() -> None:
    """(Three were loaded under a cap of 2: each request saw the room the others had just taken, and one victim
    was chosen for all.)"""
    ref: list[Scheduler] = []
    w = {n: LazyWorker(n, ref) for n in ("a", "b", "c", "d")}
    sched = Scheduler(w, max_loaded=2, default_ttl=lambda n: 60.0)  # type: ignore[arg-type]
    ref.append(sched)
    task = asyncio.create_task(sched.run())
    peak = 0

    def loaded() -> int:
        return sum(1 for x in w.values() if x.state in (S.STARTING, S.READY, S.STOPPING))

    async def settle_lazily() -> None:
        nonlocal peak
        for _ in range(30):
            await asyncio.sleep(0.005)
            peak = max(peak, loaded())
            for x in w.values():
                if x.state == S.STARTING:
                    x.become_ready()
                elif x.state == S.STOPPING:
                    x.finish_stop()

    try:
        first = [sched.acquire("1", "a", None), sched.acquire("2", "b", None), sched.acquire("3", "c", None)]
        await settle_lazily()
        assert peak <= 2 and sum(f.done() for f in first) == 2
        for lease, f in zip(("1", "2", "3"), first, strict=True):
            if f.done():
                sched.release(lease)
        later = [sched.acquire("4", "d", None)]
        await settle_lazily()
        await asyncio.wait_for(asyncio.gather(*first, *later), 2)
        assert peak <= 2
        assert sum(x.stops for x in w.values()) == len({n for n, x in w.items() if x.stops})  # no victim twice
    finally:
        task.cancel()
