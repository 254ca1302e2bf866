"""The supervisor process: control socket, metrics proxy, gateways, workers on demand, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil
import structlog
import zmq
import zmq.asyncio

from bus import endpoints
from bus.codec import COMMANDS, REPLIES, BusDecodeError, encode_event
from bus.protocol import (
    Acquire,
    ConfigReloaded,
    ErrorReply,
    GatewayLaunch,
    ModelParams,
    Ok,
    ProcessHello,
    ProcessInfo,
    ProcessStateEvent,
    Release,
    Reload,
    Reply,
    RestartWorker,
    Shutdown,
    StartWorker,
    Status,
    StatusReply,
    StopWorker,
    SystemMetrics,
    WhisperParams,
    WorkerEndpoint,
    WorkerHello,
    WorkerInfo,
    WorkerLaunch,
    WorkerState,
    WorkerStateEvent,
)
from config import runtime
from config.loader import ACCEPTED_DIR, Config, ConfigError, load_config, model_size, write_accepted
from supervisor.logs import log_limits
from supervisor.metrics_tcp import TcpMetrics, proxy_events
from supervisor.processes import EXIT_CANNOT_LISTEN, python_module, spawn, terminate
from supervisor.reload import plan as reload_plan
from supervisor.scheduler import Scheduler
from supervisor.states import backoff_delay
from supervisor.worker_manager import LOAD_FAILED, Policy, WorkerManager, WorkerUnavailable, missing_model

log = structlog.get_logger()


class ManagedProcess:
    """A gateway or the dashboard: kept running, restarted with backoff when it dies."""

    def __init__(self, name: str, argv: list[str], log_path: Path, sup: Supervisor, port: int = 0) -> None:
        self.name, self.argv, self.log_path, self.sup, self.port = name, argv, log_path, sup, port
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.state, self.message = "stopped", ""

    def info(self) -> ProcessInfo:
        return ProcessInfo(name=self.name, pid=self.proc.pid if self.proc else 0, state=self.state,
                           restarts=self.restarts, port=self.port)

    async def run(self) -> None:
        failures = 0
        limits = self.sup.config.app.limits
        while not self.sup.stopping:
            started = time.monotonic()
            self.proc = await spawn(self.argv, self.log_path)
            self._set("running")
            code = await self.proc.wait()
            self.sup.process_exited(self.proc.pid)
            if self.sup.stopping:
                break
            failures = failures + 1 if time.monotonic() - started < 30 else 1
            self.restarts += 1
            delay = backoff_delay(failures, limits.restart_backoff_s, limits.restart_backoff_max_s)
            if code == EXIT_CANNOT_LISTEN:
                why = (f"cannot listen on {self.sup.config.app.host}:{self.port} (in use by another program? "
                       "choose another port in app_config.json or on the command line)")
                self._set("backoff", f"{why}; retrying in {delay:.1f}s")
                log.error("cannot_listen", process=self.name, port=self.port, retry_in=delay, hint=why)
            else:
                self._set("backoff", f"exited with code {code}; restarting in {delay:.1f}s")
                log.warning("process_exited", process=self.name, code=code, restart_in=delay)
            await asyncio.sleep(delay)
        self._set("stopped")

    def _set(self, state: str, message: str = "") -> None:
        self.state, self.message = state, message
        self.announce()

    def announce(self) -> None:
        """Publish this process' state (at each change, and to each new subscriber)."""
        self.sup.publish(endpoints.topic_process_state(self.name), ProcessStateEvent(
            name=self.name, state=self.state, pid=self.proc.pid if self.proc else 0, restarts=self.restarts,
            message=self.message))

    async def stop(self, grace: float) -> None:
        if self.proc is not None:
            await terminate(self.proc, grace)


class Supervisor:
    def __init__(self, config: Config, run_dir: Path, logs_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.logs_dir = logs_dir
        self.ctx = zmq.asyncio.Context()
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self.workers: dict[str, WorkerManager] = {}
        self.processes: list[ManagedProcess] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.policy = Policy()  # (one, shared by every worker's manager: a reload changes it in place)
        self._apply_limits(config)
        self.llama_server = runtime.find_llama_server(config.app.llama_server_path)
        self.scheduler: Scheduler | None = None
        self._idents: dict[bytes, int] = {}  # control socket identity -> pid of a gateway/dashboard

    # ------------------------------------------------------------------ setup
    def _bind(self) -> None:
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.linger = 0
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for name in (endpoints.CONTROL_SOCK, endpoints.METRICS_IN_SOCK, endpoints.METRICS_SOCK):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.run_dir / name)
        self.control.bind(endpoints.control(self.run_dir))
        self._proxy_thread = threading.Thread(target=self._metrics_proxy, name="metrics-proxy", daemon=True)
        self._proxy_ready = threading.Event()
        self._proxy_thread.start()
        self._proxy_ready.wait(5)
        self.tcp_metrics: TcpMetrics | None = None
        if self.config.app.metrics.tcp_port is not None:
            sync_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(self.ctx.underlying)  # plain sockets
            self.tcp_metrics = TcpMetrics(sync_ctx, self.run_dir, self.config.app.host, self.config.app.metrics)
            self.tcp_metrics.start()
        # An XPUB (verbose): it hears every subscription, a repeated one too, so that a subscriber gets the current
        # state of every process and worker when it subscribes (_replay_states).
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.linger = 0
        self.pub.sndhwm = 1000
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.pub.connect(endpoints.metrics_in(self.run_dir))

    def _metrics_proxy(self) -> None:
        """XSUB (publishers connect) -> XPUB (subscribers connect). Runs in its own thread."""

        def attach(xsub: zmq.Socket, xpub: zmq.Socket) -> bool:
            xsub.bind(endpoints.metrics_in(self.run_dir))
            xpub.bind(endpoints.metrics(self.run_dir))
            return True

        proxy_events(self.ctx, attach, self._proxy_ready)

    async def _replay_states(self) -> None:
        """A last-value cache of the state topics: whoever subscribes to them (the bus forwards every subscription
        to this socket) gets the current state of every process and worker at once, then the changes. Without it
        a subscriber saw only what changed after it joined: after a supervisor restart, no process ever running."""
        state = endpoints.TOPIC_STATE.encode()
        while True:
            msg = await self.pub.recv()
            if msg[:1] != b"\x01":
                continue
            prefix = bytes(msg[1:])
            if not (state.startswith(prefix) or prefix.startswith(state)):
                continue
            await asyncio.sleep(0.05)  # (its other subscriptions arrive with it: one replay for them all)
            for proc in self.processes:
                proc.announce()
            for mgr in list(self.workers.values()):
                self._publish_worker(mgr.info(), changed=False)

    def publish(self, topic: str, event: Any) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.pub.send_multipart(encode_event(topic, event), zmq.NOBLOCK)

    def _publish_worker(self, info: WorkerInfo, changed: bool = True) -> None:
        if changed and self.scheduler is not None:
            self.scheduler.worker_changed(info.name)
        self.publish(endpoints.topic_worker_state(info.name), WorkerStateEvent(
            name=info.name, state=info.state, pid=info.pid, backend_pid=info.backend_pid,
            restarts=info.restarts, message=info.message))

    def _launch(self, config: Config, name: str) -> WorkerLaunch:
        app, model = config.app, config.models.models[name]
        p = model.parameters
        return WorkerLaunch(
            name=name, kind=model.type, model_path=str(config.model_path(model)),
            run_dir=str(self.run_dir), logs_dir=str(self.logs_dir), supervisor_pid=os.getpid(),
            llama_server=str(self.llama_server or ""), alias=name, queue_size=app.limits.queue_size,
            logs=log_limits(app),
            params=ModelParams(ctx_size=p.ctx_size, threads=p.threads, parallel=p.parallel,
                               extra_args=model.backend_args()),
            load_timeout_s=app.limits.load_timeout_s,
            whisper=msgspec.convert(msgspec.to_builtins(model.whisper), WhisperParams),
        )

    def _add_worker(self, launch: WorkerLaunch) -> None:
        mgr = WorkerManager(launch=launch, policy=self.policy, publish=self._publish_worker,
                            log_path=self.logs_dir / f"worker-{launch.name}.out")
        self.workers[launch.name] = mgr
        mgr.task = self._track(mgr.run())

    def _make_workers(self) -> None:
        app = self.config.app
        for name in self.config.models.models:
            self._add_worker(self._launch(self.config, name))
        self.scheduler = Scheduler(self.workers, max_loaded=app.limits.max_loaded_models,
                                   default_ttl=self._ttl, max_keep_alive=app.limits.max_keep_alive_s,
                                   memory_budget=app.limits.memory_budget_bytes, footprint=self._footprint)
        self._track(self.scheduler.run())

    async def reload(self) -> str:
        """Re-read the config; restart only workers whose settings changed; add new; drain and stop removed."""
        try:
            new = load_config(self.config.config_dir)
        except ConfigError as exc:
            raise WorkerUnavailable("bad_config", f"config not reloaded: {exc}", 400) from None
        new = self._overrides(new)
        old_launches = {n: m.launch for n, m in self.workers.items()}
        new_launches = {n: self._launch(new, n) for n in new.models.models}
        plan = reload_plan(self.config, new, old_launches, new_launches)
        self.config = new
        try:
            write_accepted(new, self.run_dir)
        except OSError as exc:  # (the gateways then read the files as they are, as before: not worth a failed reload)
            log.error("accepted_config_not_written", error=str(exc))
        assert self.scheduler is not None
        self.scheduler.max_loaded = new.app.limits.max_loaded_models
        self.scheduler.max_keep_alive = new.app.limits.max_keep_alive_s
        self.scheduler.memory_budget = new.app.limits.memory_budget_bytes
        self._apply_limits(new)
        curve = self.tcp_metrics.read_clients() if self.tcp_metrics is not None else ""  # (the folder set at `up`)
        for name, launch in new_launches.items():
            if name in self.workers and name not in plan.changed:
                self.workers[name].launch = launch  # (a change that needs no restart, e.g. queue_size: next start)
        for name in plan.added:
            self._add_worker(new_launches[name])
        for name in plan.changed:
            self._track(self._drain_and_restart(name, new_launches[name]))
        for name in plan.removed:
            self._track(self._drain_and_remove(name))
        self.publish(endpoints.TOPIC_STATE + "config/", ConfigReloaded(
            added=plan.added, changed=plan.changed, removed=plan.removed))
        summary = plan.summary() if not curve else f"{curve}; {plan.summary()}" if plan.summary() != "no change" \
            else curve
        log.info("config_reloaded", summary=summary)
        return summary

    def _apply_limits(self, config: Config) -> None:
        limits = config.app.limits
        p = self.policy
        p.grace_s, p.backoff_s = limits.shutdown_grace_s, limits.restart_backoff_s
        p.backoff_max_s, p.max_failures = limits.restart_backoff_max_s, limits.max_restarts

    async def _drain(self, name: str) -> None:
        """Until the requests under way on ``name`` are done (at most the request timeout)."""
        assert self.scheduler is not None
        deadline = time.monotonic() + self.config.app.limits.request_timeout_s
        while self.scheduler.leases(name) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    async def _drain_and_restart(self, name: str, launch: WorkerLaunch) -> None:
        """A model whose settings changed: its requests under way finish, then it restarts with the new ones."""
        mgr = self.workers[name]
        mgr.launch = launch
        if mgr.state in (WorkerState.STOPPED, WorkerState.FATAL):
            return  # (its next start uses them)
        await self._drain(name)
        if self.workers.get(name) is not mgr or mgr.launch is not launch:
            return  # (removed, or changed again, meanwhile)
        if mgr.state not in (WorkerState.STOPPED, WorkerState.FATAL):  # (not unloaded meanwhile)
            mgr.restart(keep_up=False)  # (a model loaded for requests stays one: a failed load is not retried)

    async def _drain_and_remove(self, name: str) -> None:
        mgr = self.workers[name]
        await self._drain(name)
        if name in self.config.models.models:  # added back by a reload meanwhile (it said "no change"): it stays
            return
        await mgr.stop()
        if name in self.config.models.models:
            return
        if self.workers.get(name) is mgr:
            del self.workers[name]
            if mgr.task is not None:
                mgr.task.cancel()

    def _overrides(self, config: Config) -> Config:
        """Keep what `up` was told on the command line (ports, logs dir) across reloads; a port's keys and CORS
        origins are the file's (the gateways apply them at once)."""
        old, new = self.config.app.proxies, config.app.proxies
        proxies = msgspec.structs.replace(new, **{
            proto: msgspec.structs.replace(getattr(new, proto), port=getattr(old, proto).port,
                                           enabled=getattr(old, proto).enabled) for proto in ("ollama", "lmstudio")})
        return Config(app=msgspec.structs.replace(
            config.app, proxies=proxies, dashboard=self.config.app.dashboard,
            logs_dir=self.config.app.logs_dir), models=config.models, config_dir=config.config_dir)

    def _footprint(self, name: str) -> int:
        """Estimated bytes of a loaded model (config/schema.py ModelConfig.footprint)."""
        model = self.config.models.models.get(name)
        if model is None:
            return 0
        size = self.config.model_size(model) if model.memory_bytes is None else 0
        return model.footprint(size, self.config.app.limits.kv_bytes_per_token)

    def _ttl(self, name: str) -> float:
        model = self.config.models.models.get(name)
        if model is not None and model.idle_ttl_s is not None:
            return model.idle_ttl_s
        return self.config.app.limits.idle_ttl_s

    def worker_info(self, mgr: WorkerManager) -> WorkerInfo:
        info = mgr.info()
        assert self.scheduler is not None
        size = model_size(Path(mgr.launch.model_path))
        return msgspec.structs.replace(info, leases=self.scheduler.leases(mgr.name),
                                       expires_at=self.scheduler.expires_at(mgr.name),
                                       model_path=mgr.launch.model_path, size_bytes=size)

    def _make_processes(self) -> None:
        app = self.config.app
        for proto, proxy in (("ollama", app.proxies.ollama), ("openai", app.proxies.lmstudio)):
            if not proxy.enabled:
                continue
            launch = GatewayLaunch(
                protocol=proto, host=app.host, port=proxy.port, run_dir=str(self.run_dir),
                logs_dir=str(self.logs_dir), supervisor_pid=os.getpid(), config_dir=str(self.config.config_dir),
                request_timeout_s=app.limits.request_timeout_s, load_timeout_s=app.limits.load_timeout_s,
                shutdown_grace_s=app.limits.shutdown_grace_s, logs=log_limits(app),
            )
            argv = python_module("gateway", msgspec.json.encode(launch).decode())
            self.processes.append(ManagedProcess(f"gateway-{proto}", argv, self.logs_dir / f"gateway-{proto}.out",
                                                 self, proxy.port))
        if app.dashboard.enabled:
            launch = GatewayLaunch(
                protocol="dashboard", host=app.host, port=app.dashboard.port, run_dir=str(self.run_dir),
                logs_dir=str(self.logs_dir), supervisor_pid=os.getpid(), config_dir=str(self.config.config_dir),
                shutdown_grace_s=app.limits.shutdown_grace_s, logs=log_limits(app),
            )
            argv = python_module("dashboard", msgspec.json.encode(launch).decode())
            self.processes.append(ManagedProcess("dashboard", argv, self.logs_dir / "dashboard.out", self,
                                                 app.dashboard.port))

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        write_accepted(self.config, self.run_dir)  # (what the gateways run on: see config/loader.py)
        self._bind()
        self._make_workers()
        self._make_processes()
        (self.run_dir / endpoints.SUPERVISOR_PID).write_text(str(os.getpid()))
        receiver = self._track(self._receive())
        self._track(self._system_metrics())
        self._track(self._replay_states())
        for proc in self.processes:
            self._track(proc.run())
        assert self.scheduler is not None
        for name in self.config.models.preload:  # (no more than max_loaded_models: the config's check)
            self.scheduler.start(self.config.resolve_model(name) or name)  # (a name or an alias)
        log.info("supervisor_up", run_dir=str(self.run_dir), llama_server=str(self.llama_server),
                 models=list(self.workers))
        if self.config.app.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening_beyond_loopback", host=self.config.app.host)
        await self.stop_requested.wait()
        await self._shutdown()
        receiver.cancel()
        return 0

    def request_stop(self) -> None:
        self.stop_requested.set()

    def request_reload(self) -> None:
        """SIGHUP: only enqueue; the reload runs as a task of the loop."""
        async def _go() -> None:
            try:
                await self.reload()
            except WorkerUnavailable as exc:
                log.error("reload_failed", error=exc.message)

        self._track(_go())

    async def _shutdown(self) -> None:
        log.info("supervisor_stopping")
        self.stopping = True
        if self.scheduler is not None:
            self.scheduler.refuse_waiting(WorkerUnavailable("shutting_down", "llama-runner is shutting down", 503))
        grace = self.config.app.limits.shutdown_grace_s
        await asyncio.gather(*(p.stop(grace) for p in self.processes), return_exceptions=True)
        stops = [w.stop() for w in self.workers.values()]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*stops, return_exceptions=True), grace + 5)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / endpoints.SUPERVISOR_PID).unlink()
        self.control.close(0)
        self.pub.close(0)
        if self.tcp_metrics is not None:
            self.tcp_metrics.stop()
        self.ctx.term()
        self._proxy_thread.join(2)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """The run dir's socket files go with the instance (bus sockets; workers' and llama-servers')."""
        names = [endpoints.CONTROL_SOCK, endpoints.METRICS_IN_SOCK, endpoints.METRICS_SOCK]
        paths = [self.run_dir / n for n in names] + [*self.run_dir.glob("w-*.sock"), *self.run_dir.glob("l-*.sock")]
        for path in paths:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
        for path in self.run_dir.glob("k-*.key"):  # (llama-servers' API keys: workers killed left theirs)
            with contextlib.suppress(OSError):
                path.unlink()
        shutil.rmtree(self.run_dir / ACCEPTED_DIR, ignore_errors=True)  # (the config it ran on)
        log.info("supervisor_stopped")

    # ------------------------------------------------------------------ control socket
    async def _receive(self) -> None:
        while True:
            frames = await self.control.recv_multipart()
            if len(frames) != 2:
                log.warning("bad_control_frames", count=len(frames))
                continue
            ident, payload = frames
            try:
                cmd = COMMANDS.decode(payload)
            except BusDecodeError as exc:
                log.warning("bad_command", error=str(exc))
                continue
            if isinstance(cmd, WorkerHello):
                mgr = self.workers.get(cmd.name)
                if mgr is not None:
                    mgr.hello(cmd)
                continue
            if isinstance(cmd, ProcessHello):
                self._idents[ident] = cmd.pid
                continue
            self._track(self._answer(ident, cmd))

    def process_exited(self, pid: int) -> None:
        """A gateway died: the leases it held are released (its requests are gone with it)."""
        assert self.scheduler is not None
        for ident in [i for i, p in self._idents.items() if p == pid]:
            del self._idents[ident]
            self.scheduler.release_owner(ident)

    async def _answer(self, ident: bytes, cmd: Any) -> None:
        try:
            reply = await self._handle(cmd, ident)
        except WorkerUnavailable as exc:
            reply = ErrorReply(request_id=cmd.request_id, code=exc.code, message=exc.message, status=exc.status)
        except Exception as exc:
            log.exception("command_failed", command=type(cmd).__name__)
            reply = ErrorReply(request_id=cmd.request_id, code="internal",
                               message=f"internal error in the supervisor ({type(exc).__name__}); see its log",
                               status=500)
        with contextlib.suppress(zmq.ZMQError):
            await self.control.send_multipart([ident, REPLIES.encode(reply)])

    def _worker(self, request_id: str, name: str) -> WorkerManager:
        if not name.strip():  # (resolve_model gives the default model for "": a command names its model)
            raise WorkerUnavailable("bad_request", "a model name is required", 400)
        resolved = self.config.resolve_model(name)
        if resolved is None or resolved not in self.workers:
            raise WorkerUnavailable("unknown_model", f"model {name!r} not found", 404)
        return self.workers[resolved]

    async def _handle(self, cmd: Any, ident: bytes = b"") -> Reply:
        rid = cmd.request_id
        if isinstance(cmd, Status):
            return StatusReply(request_id=rid, workers=[self.worker_info(w) for w in self.workers.values()],
                               processes=[p.info() for p in self.processes], pid=os.getpid())
        if isinstance(cmd, Shutdown):
            self.request_stop()
            return Ok(request_id=rid, message="shutting down")
        if self.stopping:
            raise WorkerUnavailable("shutting_down", "llama-runner is shutting down", 503)
        if isinstance(cmd, Release):
            assert self.scheduler is not None
            self.scheduler.release(cmd.lease)
            return Ok(request_id=rid)
        if isinstance(cmd, Acquire):
            mgr = self._worker(rid, cmd.model)
            assert self.scheduler is not None
            self._refuse_missing(mgr)
            fut = self.scheduler.acquire(rid, mgr.name, cmd.keep_alive_s, owner=ident)
            try:
                endpoint = await asyncio.wait_for(fut, cmd.timeout_s)
            except TimeoutError:
                self.scheduler.release(rid)
                raise WorkerUnavailable("timeout", f"model {mgr.name!r} did not load within {cmd.timeout_s:.0f}s",
                                        503) from None
            except WorkerUnavailable:
                self.scheduler.release(rid)
                raise
            return WorkerEndpoint(request_id=rid, model=mgr.name, endpoint=endpoint, kind=mgr.launch.kind)
        if isinstance(cmd, Reload):
            return Ok(request_id=rid, message=await self.reload())
        if isinstance(cmd, StartWorker):
            assert self.scheduler is not None
            await self.scheduler.start(self._refuse_missing(self._worker(rid, cmd.name), restart=False).name)
            return Ok(request_id=rid, message=f"starting {cmd.name}")
        if isinstance(cmd, StopWorker):
            mgr = self._worker(rid, cmd.name)
            assert self.scheduler is not None
            busy = self.scheduler.leases(mgr.name) if cmd.if_idle else 0
            if busy:
                return ErrorReply(request_id=rid, code="busy", status=409, message=(
                    f"{mgr.name} is serving {busy} request(s); stop it to cut them off"))
            if not cmd.when_idle:  # (an operator's stop: what waits for room to load it is refused too)
                self.scheduler.refuse_waiting(WorkerUnavailable("stopped", f"model {mgr.name!r} was stopped", 503),
                                              mgr.name)
            stopping = await self.scheduler.unload_when_idle(mgr.name) if cmd.when_idle else mgr.stop()
            if stopping is None:
                return Ok(request_id=rid, message=f"{cmd.name} unloads once its requests under way are done")
            await asyncio.wait_for(stopping, self.policy.grace_s + 10)
            return Ok(request_id=rid, message=f"stopped {cmd.name}")
        if isinstance(cmd, RestartWorker):
            assert self.scheduler is not None
            await self.scheduler.start(self._refuse_missing(self._worker(rid, cmd.name), restart=True).name,
                                       restart=True)
            return Ok(request_id=rid, message=f"restarting {cmd.name}")
        return ErrorReply(request_id=rid, code="bad_request", message=f"unknown command {type(cmd).__name__}",
                          status=400)

    @staticmethod
    def _refuse_missing(mgr: WorkerManager, restart: bool = False) -> WorkerManager:
        """A load (a request's, an operator's start or restart) of a model whose file is not there fails at once,
        before an idle model is evicted to make room for it, and without retries in the background."""
        missing = missing_model(mgr.launch) if restart or mgr.state in (WorkerState.STOPPED, WorkerState.FATAL) else ""
        if missing:
            mgr.load_refused(missing)
            raise WorkerUnavailable("load_failed", f"model {mgr.name!r} failed to load: {missing}", LOAD_FAILED)
        return mgr

    async def _system_metrics(self) -> None:
        psutil.cpu_percent()
        while True:
            await asyncio.sleep(2.0)
            vm = psutil.virtual_memory()
            load = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
            self.publish(endpoints.topic_system_metrics(), SystemMetrics(
                cpu_percent=psutil.cpu_percent(), memory_percent=vm.percent, memory_used_bytes=vm.used,
                memory_total_bytes=vm.total, load_avg=load))
