"""What every child process does for itself: notice its parent is gone, give memory back after a burst."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from supervisor import child


def test_alive_tells_a_running_process_from_a_gone_one() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert child.pid_alive(proc.pid) is False
    assert child.pid_alive(1) is True  # (not ours to signal: still alive)
    import os

    assert child.pid_alive(os.getpid()) is True


@pytest.mark.asyncio
async def test_watch_parent_calls_back_once_the_parent_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])  # noqa: ASYNC220
    gone = asyncio.Event()
    watch = asyncio.create_task(child.watch_parent(proc.pid, gone.set, interval=0.05))
    await asyncio.sleep(0.1)
    assert not gone.is_set()  # still running
    await asyncio.to_thread(proc.wait)  # gone (and reaped, as init does for an orphan's dead parent)
    await asyncio.wait_for(watch, 10)
    assert gone.is_set()


@pytest.mark.asyncio
async def test_memory_is_returned_once_after_a_burst_never_while_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(child, "return_garbage", lambda: calls.append(time.monotonic()))
    task = asyncio.create_task(child.trim_when_idle(check_s=0.1))
    try:
        await asyncio.sleep(0.35)  # idle from the start: nothing to give back
        assert calls == []
        busy_until = time.monotonic() + 0.45
        while time.monotonic() < busy_until:  # a burst: busy checks see the CPU used, no trim meanwhile
            sum(range(20_000))
            await asyncio.sleep(0)
        assert calls == []
        await asyncio.sleep(0.5)  # idle again: one trim, and only one
        assert len(calls) == 1
    finally:
        task.cancel()
