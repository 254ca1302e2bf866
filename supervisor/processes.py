"""Spawning and killing child processes: own process group, output to a log file, SIGTERM -> grace -> SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import psutil
import structlog

log = structlog.get_logger()

EXIT_CANNOT_LISTEN = 10  # a gateway or the dashboard could not bind its port (gateway/server.py uses it)


async def spawn(argv: list[str], log_path: Path) -> asyncio.subprocess.Process:
    """Start a child in its own process group (a terminal's Ctrl-C reaches only the supervisor)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        kwargs: dict[str, object] = {}
        if os.name == "nt":
            kwargs["creationflags"] = 0x00000200  # CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kwargs,  # type: ignore[arg-type]
        )


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process, its process group and every descendant (psutil: portable where it matters)."""
    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    if os.name != "nt":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    for p in [*children]:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        os.kill(pid, sig)


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL the whole tree. Returns the exit code."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            log.warning("kill_after_grace", pid=proc.pid, grace=grace)
            kill_tree(proc.pid)
            await proc.wait()
    # the group may still hold a grandchild whose parent exited: make sure it is gone
    if os.name != "nt":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode if proc.returncode is not None else -1
