"""The llama-server child of a llama worker: start on a free port, wait for health, stop, watch."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import time
from pathlib import Path

import structlog

from bus.protocol import WorkerLaunch
from supervisor.child import kill_with_parent_preexec
from workers.backend_http import BackendHTTPError, BackendPool

log = structlog.get_logger()

LISTENING = re.compile(rb"listening on https?://[^\s:]+:(\d+)")


class BackendError(Exception):
    pass


def build_argv(launch: WorkerLaunch) -> list[str]:
    p = launch.params
    return [
        launch.llama_server,
        "-m", launch.model_path,
        "--host", "127.0.0.1",
        "--port", "0",
        "--alias", launch.alias or launch.name,
        "-t", str(p.threads),
        "-c", str(p.ctx_size * p.parallel),
        "-np", str(p.parallel),
        *p.extra_args,
    ]


class LlamaServer:
    def __init__(self, launch: WorkerLaunch, log_path: Path) -> None:
        self.launch = launch
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.base_url = ""
        self._port_found: asyncio.Future[int] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._tail: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def last_output(self) -> str:
        return " | ".join(self._tail[-5:])

    async def start(self, timeout: float) -> None:
        if not self.launch.llama_server:
            raise BackendError("no llama-server binary found: run `make setup`, or set LLAMA_SERVER or "
                               "llama_server_path in app_config.json")
        argv = build_argv(self.launch)
        log.info("llama_server_start", argv=argv)
        loop = asyncio.get_running_loop()
        self._port_found = loop.create_future()
        kwargs: dict[str, object] = {}
        if sys.platform.startswith("linux"):
            kwargs["preexec_fn"] = kill_with_parent_preexec
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                **kwargs,  # type: ignore[arg-type]
            )
        except OSError as exc:
            raise BackendError(f"cannot start llama-server {argv[0]!r}: {exc.strerror}") from None
        self._pump = asyncio.create_task(self._pump_output())
        deadline = time.monotonic() + timeout
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            done, _ = await asyncio.wait({self._port_found, exited}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if self._port_found not in done:
                if exited in done:
                    await asyncio.sleep(0.05)  # let the pump read the last lines
                    raise BackendError(f"llama-server exited with code {self.proc.returncode}: {self.last_output()}")
                raise BackendError(f"llama-server did not listen within {timeout:.0f}s")
            self.port = self._port_found.result()
            self.base_url = f"http://127.0.0.1:{self.port}"
            await self._wait_healthy(deadline, exited)
        finally:
            exited.cancel()

    async def _wait_healthy(self, deadline: float, exited: asyncio.Future[int]) -> None:
        pool = BackendPool("127.0.0.1", self.port, connect_timeout=2)
        status = 0

        def on_head(code: int, _content_type: str) -> bool:
            nonlocal status
            status = code
            return True

        try:
            while True:
                if exited.done():
                    await asyncio.sleep(0.05)
                    raise BackendError(f"llama-server exited with code {self.proc.returncode if self.proc else '?'} "
                                       f"while loading: {self.last_output()}")
                try:
                    async with asyncio.timeout(2):
                        await pool.request("GET", "/health", b"", on_head, lambda _data: True)
                    if status == 200:
                        return
                except (TimeoutError, BackendHTTPError):
                    pass
                if time.monotonic() > deadline:
                    raise BackendError("llama-server did not become healthy in time")
                await asyncio.sleep(0.05)
        finally:
            pool.close()

    async def _pump_output(self) -> None:
        """Copy llama-server's output to its log file; find the port on the 'listening' line."""
        assert self.proc and self.proc.stdout
        with open(self.log_path, "ab", buffering=0) as out:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    return
                out.write(line)
                text = line.decode(errors="replace").rstrip()
                self._tail = [*self._tail[-19:], text]
                if self._port_found and not self._port_found.done():
                    m = LISTENING.search(line)
                    if m:
                        self._port_found.set_result(int(m.group(1)))

    async def wait(self) -> int:
        assert self.proc
        return await self.proc.wait()

    async def stop(self, grace: float = 5.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._pump:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, 1.0)
