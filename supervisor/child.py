"""What every supervised child process does: die with its parent, and run on uvloop where available.

Imported by workers, gateways and the dashboard at start (never by the supervisor itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Linux: ask the kernel to send ``sig`` when our parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def kill_with_parent_preexec() -> None:
    """preexec_fn for grandchildren (llama-server): SIGKILL when the worker that started it dies."""
    set_parent_death_signal(signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` running (ours or not)?"""
    if os.name == "nt":  # (signal 0 would terminate it there)
        import psutil

        return bool(psutil.pid_exists(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def watch_parent(parent_pid: int, on_gone: Callable[[], Awaitable[None] | None], interval: float = 0.5) -> None:
    """Portable fallback to the death signal: poll until the parent is gone, then call ``on_gone``."""
    while True:
        await asyncio.sleep(interval)
        if os.getppid() != parent_pid and not pid_alive(parent_pid):
            result = on_gone()
            if asyncio.iscoroutine(result):
                await result
            return


def read_launch(module: str, kind: type[T], argv: list[str] | None, process: Callable[[T], str]) -> T | None:
    """A child's start: decode its launch spec (the one argument), die with the supervisor, set up logging."""
    import msgspec

    from supervisor.logs import setup_logging

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} '<{kind.__name__} JSON>' (the supervisor starts it)", file=sys.stderr)
        return None
    try:
        launch = msgspec.json.decode(args[0], type=kind)
    except msgspec.DecodeError as exc:
        print(f"bad {kind.__name__}: {exc}", file=sys.stderr)
        return None
    set_parent_death_signal()
    setup_logging(process(launch), launch.logs_dir, limits=launch.logs)  # type: ignore[attr-defined]
    return launch


STARTED_AFTER_S = 3.0  # start-up is over (imports, config, first connections)
IDLE_CHECK_S = 1.0  # a process that used less than IDLE_CPU of a core over this long is idle
IDLE_CPU = 0.02


def return_garbage() -> None:
    """Collect the garbage and hand the allocator's free pages back to the OS (glibc keeps them otherwise)."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _after_start_up() -> None:
    """Once started: what start-up left (~1 MB per process) goes back, and what it built (modules, config) is
    frozen out of the cyclic collector's sight: its full collections then walk a request's objects only."""
    import gc

    return_garbage()
    gc.freeze()


async def trim_when_idle(check_s: float = IDLE_CHECK_S) -> None:
    """After a burst of work, once idle again: return what the burst left in the allocator's free lists
    (a gateway keeps 1-3 MB after a load otherwise). Never while busy: a trim walks the heap."""
    last = time.process_time()
    worked = False
    while True:
        await asyncio.sleep(check_s)
        now = time.process_time()
        busy = now - last > check_s * IDLE_CPU
        if busy:
            worked = True
        elif worked:
            worked = False
            return_garbage()
            now = time.process_time()  # (the trim's own CPU is not work)
        last = now


async def _started(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    asyncio.get_running_loop().call_later(STARTED_AFTER_S, _after_start_up)
    trimmer = asyncio.create_task(trim_when_idle())
    try:
        return await main()
    finally:
        trimmer.cancel()


def run(main: Callable[[], Coroutine[Any, Any, int]], *, fast_loop: bool = True) -> int:
    """Run ``main`` (on uvloop if installed and ``fast_loop``); return its exit code."""
    if fast_loop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(_started(main))
    return asyncio.run(_started(main))


def install_stop_signals(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT only enqueue a stop; the main loop acts."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError):
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop))
