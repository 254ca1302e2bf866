"""The two config files, decoded into msgspec Structs with constraints. All defaults live here."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
# Model names: what clients send. No path separators or control characters: names never become paths.
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")]


class _Cfg(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


ApiKey = Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=r"^[\x21-\x7e]+$")]
# An origin as browsers send it (scheme://host[:port]), or "*" for any; "*" in one matches any characters there
# (Ollama's OLLAMA_ORIGINS patterns: "http://localhost:*", "chrome-extension://*").
CorsOrigin = Annotated[str, msgspec.Meta(pattern=r"^(\*|[A-Za-z][A-Za-z0-9+.-]*://[^/\s]+)$")]


class ProxyConfig(_Cfg):
    enabled: bool = True
    port: Port = 0
    # Clients must send `Authorization: Bearer <one of these>` (empty: no authentication). Never logged.
    api_keys: list[ApiKey] = []
    # Origins whose web pages may call this API (CORS); empty: no CORS headers at all; ["*"]: any origin. The shipped
    # app_config.json gives the Ollama port Ollama's own default list (this machine's pages, app:// and the like).
    cors_origins: list[CorsOrigin] = []


def _ollama() -> ProxyConfig:
    return ProxyConfig(enabled=True, port=11434)


def _lmstudio() -> ProxyConfig:
    return ProxyConfig(enabled=True, port=1234)


class ProxiesConfig(_Cfg):
    ollama: ProxyConfig = msgspec.field(default_factory=_ollama)
    lmstudio: ProxyConfig = msgspec.field(default_factory=_lmstudio)


class DashboardConfig(_Cfg):
    enabled: bool = True
    port: Port = 8585
    # Needed for control actions when the dashboard listens beyond 127.0.0.1 (`host` not loopback). Unset
    # there: `llama-runner up` makes one per run and prints it.
    token: str | None = None


class MetricsConfig(_Cfg):
    # The metrics bus is always at ipc://<run dir>/metrics.sock; a port here publishes it on tcp too, on
    # `host` (loopback unless configured), for local apps that cannot reach the run dir.
    tcp_port: Port | None = None
    # Encrypt the tcp endpoint with CurveZMQ (subscribers need the server's public certificate, server.key in
    # curve_keys_dir: default <cache>/llama-runner/metrics-curve); with curve_clients_dir, only subscribers
    # whose public certificates are in that folder get in.
    curve: bool = False
    curve_keys_dir: str | None = None
    curve_clients_dir: str | None = None


class LimitsConfig(_Cfg):
    max_loaded_models: PositiveInt = 2
    # Requests a model queues beyond its slots (Ollama's OLLAMA_MAX_QUEUE is 512: a client library's batch of
    # 20-100 prompts just waits its turn); 429 (the Ollama port: 503) beyond.
    queue_size: Annotated[int, msgspec.Meta(ge=0)] = 512
    load_timeout_s: PositiveFloat = 120.0
    request_timeout_s: PositiveFloat = 600.0
    # How long an idle model stays loaded (Ollama's keep_alive default): 0 unloads at once, negative never.
    idle_ttl_s: float = 300.0
    # Optional memory budget for all loaded models together (bytes); each model's footprint is estimated as
    # its file size plus its KV cache (ctx_size x parallel x kv_bytes_per_token) plus its prompt cache
    # (parameters.cache_ram_mib), or set per model (memory_bytes).
    memory_budget_bytes: PositiveInt | None = None
    kv_bytes_per_token: PositiveInt = 32 * 1024
    # The server's cap on a client's keep_alive / ttl (null: no cap; a negative request keeps forever).
    max_keep_alive_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    restart_backoff_s: PositiveFloat = 1.0
    restart_backoff_max_s: PositiveFloat = 30.0
    max_restarts: PositiveInt = 5
    shutdown_grace_s: PositiveFloat = 5.0
    # Largest audio upload (/v1/audio/*) in bytes: 413 beyond it, enforced while reading the upload.
    max_upload_bytes: PositiveInt = 25 * 1024 * 1024
    # Largest JSON request body in bytes (413 beyond it), and what one request may ask for (413).
    max_body_bytes: PositiveInt = 32 * 1024 * 1024
    max_messages: PositiveInt = 10_000
    max_prompt_chars: PositiveInt = 8_000_000  # all prompt / message / input text of one request together
    # A client must send its whole request body within this time (408 after it): slow clients hold nothing.
    read_timeout_s: PositiveFloat = 60.0


class AppConfig(_Cfg):
    host: str = "127.0.0.1"
    proxies: ProxiesConfig = msgspec.field(default_factory=ProxiesConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    llama_server_path: str | None = None
    models_root: str | None = None
    run_dir: str | None = None
    logs_dir: str = "logs"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Every log file (each process's, llama-server's) is rotated at this size, keeping log_backups old ones.
    log_max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 10 * 1024 * 1024
    log_backups: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)


class ModelParameters(_Cfg):
    ctx_size: PositiveInt = 2048
    threads: PositiveInt = 1
    parallel: PositiveInt = 1
    # llama-server's prompt cache in host memory (--cache-ram, MiB; -1: no limit, 0: off). llama-server's own
    # default, 8 GiB, let a worker grow from 0.2 to 1.5 GB over a few hundred distinct prompts; counted in the
    # memory budget's estimate of the model.
    cache_ram_mib: Annotated[int, msgspec.Meta(ge=-1)] = 512
    extra_args: list[str] = []


class WhisperConfig(_Cfg):
    """faster-whisper settings of a ``"type": "whisper"`` model (ignored for llama models)."""

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "int8"  # ctranslate2's: int8, int8_float16, float16, float32, default, ...
    cpu_threads: PositiveInt = 1
    beam_size: PositiveInt = 5
    language: Annotated[str, msgspec.Meta(min_length=2, max_length=16)] | None = None  # None: detect
    # Longer audio is refused (400 audio_too_long) as it is decoded: faster-whisper takes ~3 GB of memory an hour
    # of audio, whatever the file's size (an hour of silence fits in 656 KB of FLAC).
    max_audio_s: PositiveFloat = 3600.0


ModelMode = Literal["chat", "embedding", "both"]
Pooling = Literal["none", "mean", "cls", "last", "rank"]


CACHE_RAM_FLAG = "--cache-ram"
CACHE_RAM_FLAGS = ("-cram", CACHE_RAM_FLAG)  # (llama-server's short and long names)


# A chat model's prompt goes to llama-server's decoder this many tokens at a time (Ollama's num_batch): llama-server
# sees a cancelled request only between two such batches, and its own 2048 kept a model busy 7-10 s on a prompt
# whose client was gone (an editor's completion, given up on as the user typed on). No slower on a CPU: the
# micro-batch (-ub, 512) is what one computation takes either way.
CHAT_BATCH = 512


def llama_server_args(mode: str, pooling: str | None, p: ModelParameters) -> list[str]:
    """``p.extra_args`` plus the prompt cache's size (``--cache-ram``), a chat model's batch (``-b``, CHAT_BATCH),
    and what an embedding model needs:
    ``--embeddings``, ``--pooling``, and a batch as large as the context (llama-server embeds an input in one
    batch). Idempotent: flags already there stay."""
    args = list(p.extra_args)
    given = {a.split("=", 1)[0] for a in args}
    if not set(CACHE_RAM_FLAGS) & given:
        args += [CACHE_RAM_FLAG, str(p.cache_ram_mib)]
    if mode == "chat":
        if not {"-b", "--batch-size"} & given:
            args += ["-b", str(CHAT_BATCH)]
        return args
    if not {"--embedding", "--embeddings"} & set(args):
        args.append("--embeddings")
    if pooling is not None and "--pooling" not in args:
        args += ["--pooling", pooling]
    for short, long in (("-b", "--batch-size"), ("-ub", "--ubatch-size")):
        if short not in args and long not in args:
            args += [short, str(p.ctx_size)]
    return args


# llama-server's flags that load a multimodal projector (then a chat model takes image and audio parts)
MMPROJ_FLAGS = frozenset({"--mmproj", "-mm", "--mmproj-url", "-mmu", "-hf", "--hf-repo"})


class ModelConfig(_Cfg):
    model_path: Annotated[str, msgspec.Meta(min_length=1)]
    type: Literal["llama", "whisper"] = "llama"
    aliases: list[ModelName] = []
    parameters: ModelParameters = msgspec.field(default_factory=ModelParameters)
    idle_ttl_s: float | None = None  # overrides limits.idle_ttl_s for this model
    memory_bytes: PositiveInt | None = None  # this model's footprint when loaded (default: estimated)
    # What a llama model serves: chat/completions, embeddings, or both (llama-server with --embeddings).
    mode: ModelMode = "chat"
    # Embedding pooling (llama-server --pooling); null: the model's own default.
    pooling: Pooling | None = None
    whisper: WhisperConfig = msgspec.field(default_factory=WhisperConfig)

    def backend_args(self) -> list[str]:
        """The llama-server flags beyond the common ones: extra_args plus what the mode needs."""
        return llama_server_args(self.mode, self.pooling, self.parameters)

    def footprint(self, file_size: int, kv_bytes_per_token: int) -> int:
        """Estimated bytes when loaded: ``memory_bytes`` if set, else the file, the KV cache (ctx_size x parallel x
        kv_bytes_per_token) and the prompt cache (``cache_ram_mib``; unbounded, -1, is not counted)."""
        if self.memory_bytes is not None:
            return self.memory_bytes
        p = self.parameters
        cache = max(self.cache_ram(), 0) << 20 if self.type == "llama" else 0  # (whisper has no prompt cache)
        return file_size + p.ctx_size * p.parallel * kv_bytes_per_token + cache

    def cache_ram(self) -> int:
        """The prompt cache's MiB its llama-server gets: a --cache-ram/-cram of extra_args, else cache_ram_mib."""
        args = self.parameters.extra_args
        for i, arg in enumerate(args):
            flag, _, value = arg.partition("=")
            if flag in CACHE_RAM_FLAGS:
                value = value or (args[i + 1] if i + 1 < len(args) else "")
                try:
                    return int(value)
                except ValueError:
                    break
        return self.parameters.cache_ram_mib

    @property
    def serves_chat(self) -> bool:
        return self.type == "llama" and self.mode != "embedding"

    @property
    def serves_embeddings(self) -> bool:
        return self.type == "llama" and self.mode != "chat"

    @property
    def serves_media(self) -> bool:
        """Does its llama-server take images or audio (a multimodal projector among its extra_args)?"""
        return self.serves_chat and any(a.split("=", 1)[0] in MMPROJ_FLAGS for a in self.parameters.extra_args)


class ModelsConfig(_Cfg):
    models: dict[ModelName, ModelConfig] = {}
    default_model: str | None = None
    preload: list[str] = []  # models started at `up`
