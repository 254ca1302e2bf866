"""The one source of truth of llama-runner's wire protocol.

Every message that crosses a process boundary is a msgspec Struct defined here, grouped in unions:

- ``Command``: to the supervisor's control ROUTER (from gateways, the CLI, the dashboard, and workers).
- ``Reply``: the supervisor's answers, correlated by ``request_id``.
- ``Job``: gateway DEALER -> worker ROUTER.
- ``StreamItem``: worker -> gateway, the answer to a Job (``Head``, ``Data``..., then ``End`` or ``Fail``).
- ``Event``: published on the metrics PUB/SUB bus (JSON, for any local app), with ``v`` = schema version.
- ``WorkerLaunch`` / ``GatewayLaunch``: the spec the supervisor hands a child process at start.

New fields always get defaults (schema evolution); decoders ignore unknown fields.
"""

from __future__ import annotations

import enum
import time

import msgspec

SCHEMA_VERSION = 1


class WorkerState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FATAL = "fatal"


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


# --------------------------------------------------------------------------- commands (-> supervisor)
class Status(_Msg, tag="status"):
    request_id: str


class StartWorker(_Msg, tag="start"):
    request_id: str
    name: str


class StopWorker(_Msg, tag="stop"):
    request_id: str
    name: str


class RestartWorker(_Msg, tag="restart"):
    request_id: str
    name: str


class Shutdown(_Msg, tag="shutdown"):
    request_id: str


class Acquire(_Msg, tag="acquire"):
    """A gateway asks for a READY worker of ``model`` (a configured name or alias); may start it.

    The request_id is also the lease: the worker counts as busy (never evicted) until ``Release``.
    ``keep_alive_s``: how long the model stays loaded after this request (None: the model's idle TTL;
    0: unload when idle; negative: forever), within the server's cap.
    """

    request_id: str
    model: str
    timeout_s: float = 120.0
    keep_alive_s: float | None = None


class Release(_Msg, tag="release"):
    """The request holding ``lease`` is over (or its client went away while the model was loading)."""

    request_id: str
    lease: str


class Reload(_Msg, tag="reload"):
    """Re-read the config: restart only workers whose settings changed, add and drain models."""

    request_id: str


class WorkerHello(_Msg, tag="worker_hello"):
    """A worker tells the supervisor its state (sent on every change of its backend's state)."""

    request_id: str
    name: str
    pid: int
    state: WorkerState
    endpoint: str = ""
    backend_pid: int = 0
    message: str = ""


Command = (
    Status | StartWorker | StopWorker | RestartWorker | Shutdown | Acquire | Release | Reload | WorkerHello
)


# --------------------------------------------------------------------------- replies (supervisor ->)
class Ok(_Msg, tag="ok"):
    request_id: str
    message: str = ""


class ErrorReply(_Msg, tag="error"):
    """``code``: unknown_model | load_failed | timeout | busy | bad_request | shutting_down | internal."""

    request_id: str
    code: str
    message: str
    status: int = 500


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str
    state: WorkerState
    pid: int = 0
    backend_pid: int = 0
    endpoint: str = ""
    restarts: int = 0
    started_at: float = 0.0
    last_used: float = 0.0
    message: str = ""
    leases: int = 0
    expires_at: float = 0.0  # when an idle worker will be unloaded (0: never / not scheduled)
    model_path: str = ""
    size_bytes: int = 0


class ProcessInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    pid: int = 0
    state: str = "stopped"
    restarts: int = 0
    port: int = 0


class StatusReply(_Msg, tag="status_reply"):
    request_id: str
    workers: list[WorkerInfo] = []
    processes: list[ProcessInfo] = []
    pid: int = 0


class WorkerEndpoint(_Msg, tag="worker_endpoint"):
    request_id: str
    model: str
    endpoint: str
    kind: str = "llama"


Reply = Ok | ErrorReply | StatusReply | WorkerEndpoint


# --------------------------------------------------------------------------- jobs (gateway -> worker)
class HttpJob(_Msg, tag="http"):
    """Forward one HTTP request to the worker's backend; the answer streams back as StreamItems."""

    request_id: str
    path: str
    body: bytes = b""
    method: str = "POST"
    stream: bool = False


class Cancel(_Msg, tag="cancel"):
    request_id: str


Job = HttpJob | Cancel


# --------------------------------------------------------------------------- stream items (worker -> gateway)
class Head(_Msg, tag="head"):
    request_id: str
    status: int
    content_type: str = ""


class Data(_Msg, tag="data"):
    """Everything the backend produced in one read, unparsed."""

    request_id: str
    data: bytes


class End(_Msg, tag="end"):
    request_id: str


class Fail(_Msg, tag="fail"):
    """The request failed. ``source`` says who failed: "proxy" (llama-runner) or "backend"."""

    request_id: str
    status: int
    code: str
    message: str
    source: str = "proxy"


StreamItem = Head | Data | End | Fail


# --------------------------------------------------------------------------- events (PUB/SUB, JSON)
def _now() -> float:
    return time.time()


class WorkerStateEvent(_Msg, tag="worker_state"):
    name: str
    state: WorkerState
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    pid: int = 0
    backend_pid: int = 0
    restarts: int = 0
    message: str = ""


class WorkerMetrics(_Msg, tag="worker_metrics"):
    name: str
    state: WorkerState
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    pid: int = 0
    backend_pid: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    in_flight: int = 0
    queued: int = 0
    requests_total: int = 0
    errors_total: int = 0
    tokens_total: int = 0
    uptime_s: float = 0.0


class ProcessStateEvent(_Msg, tag="process_state"):
    name: str
    state: str
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    pid: int = 0
    restarts: int = 0
    message: str = ""


class SystemMetrics(_Msg, tag="system_metrics"):
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    load_avg: list[float] = []


Event = WorkerStateEvent | WorkerMetrics | ProcessStateEvent | SystemMetrics


# --------------------------------------------------------------------------- launch specs (supervisor -> child argv)
class ModelParams(msgspec.Struct, frozen=True, kw_only=True):
    ctx_size: int = 2048
    threads: int = 1
    parallel: int = 1
    extra_args: list[str] = []


class WorkerLaunch(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str  # "llama" | "whisper"
    model_path: str
    run_dir: str
    logs_dir: str
    supervisor_pid: int
    llama_server: str = ""
    params: ModelParams = ModelParams()
    queue_size: int = 8
    alias: str = ""
    load_timeout_s: float = 120.0


class GatewayLaunch(msgspec.Struct, frozen=True, kw_only=True):
    protocol: str  # "ollama" | "openai"
    host: str
    port: int
    run_dir: str
    logs_dir: str
    supervisor_pid: int
    config_dir: str = ""
    request_timeout_s: float = 600.0
    load_timeout_s: float = 120.0
