"""The llama-server child of a llama worker: start on a free port, wait for health, stop, watch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import sys
import time
from pathlib import Path

import structlog

from bus import endpoints
from bus.protocol import WorkerLaunch
from config.loader import model_file_problem
from supervisor.child import kill_with_parent_preexec
from supervisor.logs import RotatingFile
from workers.backend_http import BackendHTTPError, BackendPool

log = structlog.get_logger()

LISTENING = re.compile(rb"listening on https?://[^\s:]+:(\d+)")


class BackendError(Exception):
    pass


def build_argv(launch: WorkerLaunch, socket_path: str | None = None) -> list[str]:
    """llama-server's argv: on 127.0.0.1 at a free port, and on ``socket_path`` (a unix socket) if given."""
    p = launch.params
    return [
        launch.llama_server,
        "-m", launch.model_path,
        "--host", f"127.0.0.1,{socket_path}" if socket_path else "127.0.0.1",
        "--port", "0",
        "--alias", launch.alias or launch.name,
        "-t", str(p.threads),
        "-c", str(p.ctx_size * p.parallel),
        "-np", str(p.parallel),
        *p.extra_args,
    ]


# Flags of ours (config/schema.py llama_server_args) that an older llama-server may not know: it exits with
# "invalid argument: FLAG"; it is then started again without them.
# (config/schema.py CACHE_RAM_FLAG: not imported, the worker stays lean)
OPTIONAL_FLAGS = ("--cache-ram", "--api-key-file")


def without(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without each of ``flags`` and its value."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            out.append(arg)
    return out


def check_model_file(path: str) -> None:
    """A model file that is not there is said so plainly (llama-server says it among five lines of its log)."""
    problem = model_file_problem(path)
    if problem:
        raise BackendError(problem)


def _own_api_key(extra_args: list[str]) -> str:
    """The first key of a model's own --api-key / --api-key-file ("" when it sets none)."""
    for i, arg in enumerate(extra_args):
        name, eq, value = arg.partition("=")
        if name in ("--api-key", "--api-key-file"):
            value = value if eq else (extra_args[i + 1] if i + 1 < len(extra_args) else "")
            if name == "--api-key":
                return value.split(",")[0].strip()
            with contextlib.suppress(OSError):
                for line in Path(value).expanduser().read_text().splitlines():
                    if line.strip() and not line.startswith("#"):
                        return line.strip()
    return ""


class LlamaServer:
    def __init__(self, launch: WorkerLaunch, log_path: Path) -> None:
        self.launch = launch
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.base_url = ""
        self.serving = False  # healthy: it heeds SIGTERM (see stop)
        # Where the worker speaks to it: a unix socket beside the TCP port (llama-server listens on both; the
        # worker's requests skip loopback TCP's ACKs and wakeups), or None: TCP only (a path too long, a
        # llama-server too old to listen on unix sockets, or a --host of the model's own extra_args, which wins).
        own_host = any(a == "--host" or a.startswith("--host=") for a in launch.params.extra_args)
        self.socket_path = (endpoints.llama_socket(launch.run_dir, launch.name)
                            if launch.run_dir and not own_host else None)
        self._port_found: asyncio.Future[int] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._tail: list[str] = []
        self._dropped: set[str] = set()  # OPTIONAL_FLAGS this llama-server does not know
        # Its API key: llama-server's TCP port is open to every local process, and the gateways' api_keys and Host
        # check were walked around through it. A key of the worker's own, in a 0600 file of the private run dir
        # (not on the command line, which every user can read); a model's own --api-key(-file) wins.
        self.api_key, self.key_file = _own_api_key(launch.params.extra_args), ""

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def last_output(self) -> str:
        return " | ".join(self._tail[-5:])

    def exit_reason(self, when: str = "") -> str:
        """Why llama-server is gone: killed by a signal (its last lines are start-up's, not the cause: the OOM
        killer, or someone's kill), or its exit code and last lines."""
        code = self.proc.returncode if self.proc else None
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = " (the kernel's out-of-memory killer, or a kill -9)" if -code == signal.SIGKILL else ""
            return f"llama-server was killed by {name}{when}{hint}"
        return f"llama-server exited with code {code if code is not None else '?'}{when}: {self.last_output()}"

    def pool(self, connect_timeout: float = 10.0) -> BackendPool:
        """Keep-alive connections to this llama-server (over its unix socket when it has one)."""
        return BackendPool("127.0.0.1", self.port, connect_timeout=connect_timeout, unix_path=self.socket_path,
                           api_key=self.api_key)

    def _key_args(self) -> list[str]:
        if self.key_file:  # (started again: the same key)
            return ["--api-key-file", self.key_file]
        if self.api_key or not self.launch.run_dir:  # (the model's own key; no run dir: tests)
            return []
        self.api_key = secrets.token_urlsafe(24)
        path = Path(self.launch.run_dir) / f"k-{os.getpid()}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.api_key + "\n")
        self.key_file = str(path)
        return ["--api-key-file", self.key_file]

    async def start(self, timeout: float) -> None:
        if not self.launch.llama_server:
            raise BackendError("no llama-server binary found: run `make setup`, or set LLAMA_SERVER or "
                               "llama_server_path in app_config.json")
        check_model_file(self.launch.model_path)
        started = time.monotonic()
        while True:  # (each fallback below happens at most once)
            try:
                await self._start(max(1.0, timeout - (time.monotonic() - started)))
                return
            except BackendError:
                unknown = self._unknown_optional_flag()
                if self._refused_socket():
                    # A llama-server that does not take "127.0.0.1,PATH.sock" for --host (before unix socket
                    # support): the same again on TCP only.
                    log.warning("llama_server_no_unix_socket", output=self.last_output())
                    self.socket_path = None
                elif unknown:  # a llama-server older than a flag we add by default: the same without it
                    log.warning("llama_server_flag_unknown", flag=unknown, output=self.last_output())
                    self._dropped.add(unknown)
                else:
                    raise

    def _unknown_optional_flag(self) -> str | None:
        """Did llama-server exit refusing a flag we add by default but can do without (too old to know it)?"""
        said = " ".join(self._tail)
        return next((f for f in OPTIONAL_FLAGS if f"invalid argument: {f}" in said and f not in self._dropped), None)

    def _refused_socket(self) -> bool:
        """Did llama-server exit before listening, unable to listen on its unix socket?"""
        said = " ".join(self._tail)
        return self.socket_path is not None and self.port == 0 and "couldn't bind" in said and self.socket_path in said

    async def _start(self, timeout: float) -> None:
        if self.socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)  # a previous llama-server's (it would refuse to listen there)
        argv = without(build_argv(self.launch, self.socket_path) + self._key_args(), self._dropped)
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
                    raise BackendError(self.exit_reason())
                raise BackendError(f"llama-server did not listen within {timeout:.0f}s")
            self.port = self._port_found.result()
            self.base_url = f"http://127.0.0.1:{self.port}"
            await self._wait_healthy(deadline, exited)
            self.serving = True
        finally:
            exited.cancel()

    async def _wait_healthy(self, deadline: float, exited: asyncio.Future[int]) -> None:
        pool = self.pool(connect_timeout=2)
        status = 0

        def on_head(code: int, _content_type: str) -> bool:
            nonlocal status
            status = code
            return True

        try:
            while True:
                if exited.done():
                    await asyncio.sleep(0.05)
                    raise BackendError(self.exit_reason(" while loading"))
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
        with RotatingFile(self.log_path, self.launch.logs) as out:
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
        """SIGTERM, then SIGKILL after ``grace``; at once while it is still loading (nothing to finish, and
        llama-server heeds SIGTERM only once it serves: a load given up on held its model for the whole grace)."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            self._remove_files()  # (it died first: its socket and key file stayed in the run dir)
            return
        if not self.serving:
            grace = 0.0
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if grace else signal.SIGKILL)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._pump:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._pump, 1.0)
        self._remove_files()

    def _remove_files(self) -> None:
        for path in (self.socket_path, self.key_file):
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
