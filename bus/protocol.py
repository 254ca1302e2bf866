"""The one source of truth of llama-runner's wire protocol.

Every message that crosses a process boundary is a msgspec Struct defined here, grouped in unions:

- ``Command``: to the supervisor's control ROUTER (from gateways, the CLI, the dashboard, and workers).
- ``Reply``: the supervisor's answers, correlated by ``request_id``.
- ``Job``: gateway DEALER -> worker ROUTER; a message carries one or more, a frame each (the jobs of one loop tick).
- ``StreamItem``: worker -> gateway, the answer to a Job (``Head``, ``Data``..., then ``End`` or ``Fail``); a frame
  carries a list of them (every item for that gateway from one loop tick, see bus/pump.py).
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


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Messages are plain data (never part of a reference cycle): not tracked by the cyclic garbage collector,
    so the thousands a stream decodes do not set it off (it cost ~15% of a gateway's CPU while streaming)."""


# --------------------------------------------------------------------------- commands (-> supervisor)
class Status(_Msg, frozen=True, tag="status"):
    request_id: str


class StartWorker(_Msg, frozen=True, tag="start"):
    request_id: str
    name: str


class StopWorker(_Msg, frozen=True, tag="stop"):
    """Stop a worker now (an operator's stop: its requests under way fail), or with ``when_idle`` (a client's
    unload, Ollama's ``keep_alive: 0``) once the requests under way are done, or with ``if_idle`` only if it has
    none (decided where the leases are: a request cannot come between the look and the stop)."""

    request_id: str
    name: str
    when_idle: bool = False
    if_idle: bool = False  # refused (409 "busy") while the model serves requests (the dashboard's unload)


class RestartWorker(_Msg, frozen=True, tag="restart"):
    request_id: str
    name: str


class Shutdown(_Msg, frozen=True, tag="shutdown"):
    request_id: str


class Acquire(_Msg, frozen=True, tag="acquire"):
    """A gateway asks for a READY worker of ``model`` (a configured name or alias); may start it.

    The request_id is also the lease: the worker counts as busy (never evicted) until ``Release``.
    ``keep_alive_s``: how long the model stays loaded after this request (None: the model's idle TTL;
    0: unload when idle; negative: forever), within the server's cap.
    """

    request_id: str
    model: str
    timeout_s: float = 120.0
    keep_alive_s: float | None = None


class Release(_Msg, frozen=True, tag="release"):
    """The request holding ``lease`` is over (or its client went away while the model was loading)."""

    request_id: str
    lease: str


class Reload(_Msg, frozen=True, tag="reload"):
    """Re-read the config: restart only workers whose settings changed, add and drain models."""

    request_id: str


class ProcessHello(_Msg, frozen=True, tag="process_hello"):
    """A gateway or the dashboard says who it is: when that process dies, the supervisor releases its leases."""

    request_id: str
    name: str
    pid: int


class WorkerHello(_Msg, frozen=True, tag="worker_hello"):
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
    | ProcessHello
)


# --------------------------------------------------------------------------- replies (supervisor ->)
class Ok(_Msg, frozen=True, tag="ok"):
    request_id: str
    message: str = ""


class ErrorReply(_Msg, frozen=True, tag="error"):
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
    expires_at: float = 0.0  # when an idle worker will be unloaded (-1: kept loaded; 0: not scheduled)
    model_path: str = ""
    size_bytes: int = 0


class ProcessInfo(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    pid: int = 0
    state: str = "stopped"
    restarts: int = 0
    port: int = 0


class StatusReply(_Msg, frozen=True, tag="status_reply"):
    request_id: str
    workers: list[WorkerInfo] = []
    processes: list[ProcessInfo] = []
    pid: int = 0


class WorkerEndpoint(_Msg, frozen=True, tag="worker_endpoint"):
    request_id: str
    model: str
    endpoint: str
    kind: str = "llama"


Reply = Ok | ErrorReply | StatusReply | WorkerEndpoint


# --------------------------------------------------------------------------- jobs (gateway -> worker)
class HttpJob(_Msg, frozen=True, tag="http"):
    """Forward one HTTP request to the worker's backend; the answer streams back as StreamItems."""

    request_id: str
    path: str
    body: bytes = b""
    method: str = "POST"
    stream: bool = False
    route: str = ""  # the client's path at the gateway (e.g. /api/chat), for the request events
    gateway: str = ""  # the protocol of the gateway it came through: ollama | openai


class Cancel(_Msg, frozen=True, tag="cancel"):
    request_id: str


class TranscribeJob(_Msg, frozen=True, tag="transcribe"):
    """Speech to text on a whisper worker. ``audio`` is the uploaded file as is (a binary msgpack frame, any
    format faster-whisper's decoder reads); the worker decodes it.

    The answer streams back as ``Head`` (``application/x-ndjson``), then ``Data`` items, each one or more
    JSON lines: first ``{"type": "info", "language", "duration", ...}``, then one
    ``{"type": "segment", "id", "start", "end", "text", ...}`` per decoded segment, then ``End`` (or ``Fail``).
    ``None`` options mean the model's configured default.
    """

    request_id: str
    audio: bytes
    task: str = "transcribe"  # "transcribe" | "translate" (to English)
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None  # None or 0: faster-whisper's temperature fallback schedule
    word_timestamps: bool = False
    beam_size: int | None = None
    stream: bool = False
    route: str = ""  # the client's path at the gateway, for the request events (as HttpJob's)
    gateway: str = ""  # the protocol of the gateway it came through: ollama | openai


Job = HttpJob | Cancel | TranscribeJob


# --------------------------------------------------------------------------- stream items (worker -> gateway)
class Head(_Msg, frozen=True, tag="head"):
    request_id: str
    status: int
    content_type: str = ""


class Data(_Msg, frozen=True, tag="data"):
    """Everything the backend produced in one read, unparsed."""

    request_id: str
    data: bytes


class End(_Msg, frozen=True, tag="end"):
    request_id: str


class Fail(_Msg, frozen=True, tag="fail"):
    """The request failed. ``source`` says who failed: "proxy" (llama-runner) or "backend"; ``param``, the
    request's field at fault, if one is."""

    request_id: str
    status: int
    code: str
    message: str
    source: str = "proxy"
    param: str = ""


StreamItem = Head | Data | End | Fail


# --------------------------------------------------------------------------- events (PUB/SUB, JSON)
def _now() -> float:
    return time.time()


class WorkerStateEvent(_Msg, frozen=True, tag="worker_state"):
    name: str
    state: WorkerState
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    pid: int = 0
    backend_pid: int = 0
    restarts: int = 0
    message: str = ""


class WorkerMetrics(_Msg, frozen=True, tag="worker_metrics"):
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
    # Added for the dashboard (issue 6). Restarts are the supervisor's: see WorkerStateEvent / WorkerInfo.
    model_path: str = ""
    tokens_per_s: float = 0.0  # tokens generated per second over the last interval, all requests together
    ttft_last_s: float = 0.0  # time to first token of the latest request (from its arrival at the worker)
    ttft_p50_s: float = 0.0  # median over the last 100 requests
    requests_per_s: float = 0.0


class ProcessStateEvent(_Msg, frozen=True, tag="process_state"):
    name: str
    state: str
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    pid: int = 0
    restarts: int = 0
    message: str = ""


class GatewayMetrics(_Msg, frozen=True, tag="gateway_metrics"):
    """A gateway's figures, published every second on ``metrics/gateway/<protocol>/``.

    ``errors_total`` counts answers with status >= 500 (and handler failures), ``client_errors_total`` 4xx.
    """

    name: str  # "gateway-ollama" | "gateway-openai"
    protocol: str
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    pid: int = 0
    port: int = 0
    requests_total: int = 0
    requests_per_s: float = 0.0
    errors_total: int = 0
    client_errors_total: int = 0
    in_flight: int = 0
    open_streams: int = 0
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    uptime_s: float = 0.0


class RequestEvent(_Msg, frozen=True, tag="request"):
    """One request's life at a worker, on ``request/<model>/``: ``phase`` is queued (arrived, waiting for a
    slot; ``position`` 1 is next), position (the queue moved: its new ``position``), started (has a slot),
    first_token (first generated output), finished (``status``, ``tokens``, ``duration_s``; ``outcome`` ok |
    error | cancelled | rejected)."""

    request_id: str
    model: str
    phase: str
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    path: str = ""
    stream: bool = False
    queued_s: float = 0.0  # time spent waiting for a slot
    ttft_s: float = 0.0  # arrival -> first token
    tokens: int = 0
    duration_s: float = 0.0  # arrival -> finished
    status: int = 0
    outcome: str = ""
    position: int = 0  # place in the model's queue (queued, position), 1 = next to get a slot
    route: str = ""  # the client's path at the gateway (/api/chat; ``path`` is the backend's); queued, finished
    gateway: str = ""  # the gateway it came through: ollama | openai; queued, finished


class SystemMetrics(_Msg, frozen=True, tag="system_metrics"):
    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    load_avg: list[float] = []


class ConfigReloaded(_Msg, frozen=True, tag="config_reloaded"):
    """The supervisor re-read its config (topic ``state/config/``): gateways re-read it too."""

    v: int = SCHEMA_VERSION
    ts: float = msgspec.field(default_factory=_now)
    added: list[str] = []
    changed: list[str] = []
    removed: list[str] = []


Event = (
    WorkerStateEvent | WorkerMetrics | ProcessStateEvent | SystemMetrics | ConfigReloaded | GatewayMetrics
    | RequestEvent
)


# --------------------------------------------------------------------------- launch specs (supervisor -> child argv)
class ModelParams(msgspec.Struct, frozen=True, kw_only=True):
    ctx_size: int = 2048
    threads: int = 1
    parallel: int = 1
    extra_args: list[str] = []


class WhisperParams(msgspec.Struct, frozen=True, kw_only=True):
    """faster-whisper settings of a whisper worker (the defaults of config/schema.py's WhisperConfig)."""

    device: str = "cpu"
    compute_type: str = "int8"
    cpu_threads: int = 1
    beam_size: int = 5
    language: str | None = None
    max_audio_s: float = 3600.0  # longer audio is refused (400 audio_too_long): decoding takes ~3 GB an hour


class LogLimits(msgspec.Struct, frozen=True, kw_only=True):
    """How large a process's log file grows before it is rotated (``name.log`` -> ``name.log.1`` ...), and how
    many rotated files are kept (config/schema.py's AppConfig.log_max_bytes / log_backups)."""

    max_bytes: int = 10 * 1024 * 1024
    backups: int = 3


class WorkerLaunch(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    kind: str  # "llama" | "whisper"
    model_path: str
    run_dir: str
    logs_dir: str
    supervisor_pid: int
    llama_server: str = ""
    params: ModelParams = ModelParams()
    queue_size: int = 512
    alias: str = ""
    load_timeout_s: float = 120.0
    whisper: WhisperParams = WhisperParams()
    logs: LogLimits = LogLimits()


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
    shutdown_grace_s: float = 5.0  # at a stop: answers under way get this long (less a margin) before their error
    logs: LogLimits = LogLimits()
