"""A llama-runner instance for the benchmark: a private config (one model), free ports, its processes' pids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from config.schema import CHAT_BATCH

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ROOT / "tools" / "synthetic_upstream.py"


class BenchError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Upstream:
    """What the worker runs as its llama-server: the real binary with a GGUF, or the synthetic upstream."""

    kind: str  # "synthetic" | "real"
    binary: str  # an executable: llama-server, or a wrapper script around tools/synthetic_upstream.py
    model_path: str
    model: str  # the model's name in the config
    threads: int = 1
    ctx_size: int = 2048
    parallel: int = 1
    cache_ram_mib: int = 512  # (config/schema.py ModelParameters' default, as a worker's llama-server gets it)

    def argv(self) -> list[str]:
        """llama-server's argv as the worker builds it (workers/llama_server.py build_argv)."""
        return [
            self.binary,
            "-m",
            self.model_path,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--alias",
            self.model,
            "-t",
            str(self.threads),
            "-c",
            str(self.ctx_size * self.parallel),
            "-np",
            str(self.parallel),
            "--cache-ram",
            str(self.cache_ram_mib),
            "-b",
            str(CHAT_BATCH),
        ]


def synthetic_upstream(tmp: Path, parallel: int = 64) -> Upstream:
    """A wrapper script (the config's llama_server_path) that execs the synthetic upstream, and a dummy model."""
    wrapper = tmp / "synthetic-llama-server"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SYNTHETIC}" "$@"\n')
    wrapper.chmod(0o755)
    model = tmp / "synthetic.gguf"
    model.write_bytes(b"GGUF-synthetic")
    return Upstream("synthetic", str(wrapper), str(model), "synthetic", parallel=parallel)


def real_upstream() -> Upstream | None:
    """The real llama-server and the default model (SmolLM2), with the default config's parameters, or None."""
    from config import runtime
    from config.loader import load_config

    cfg = load_config(ROOT / "config")
    binary = runtime.find_llama_server(cfg.app.llama_server_path)
    name = cfg.models.default_model or ""
    model = cfg.models.models.get(name)
    if binary is None or model is None or not cfg.model_path(model).exists():
        return None
    p = model.parameters
    return Upstream(
        "real",
        str(binary),
        str(cfg.model_path(model)),
        name,
        threads=1,
        ctx_size=p.ctx_size,
        parallel=p.parallel,
        cache_ram_mib=p.cache_ram_mib,
    )


@dataclass
class Instance:
    upstream: Upstream
    proc: subprocess.Popen[bytes]
    run_dir: Path
    config_dir: Path
    ports: dict[str, int]
    pids: dict[str, int] = field(default_factory=dict)

    def url(self, which: str) -> str:
        return f"http://127.0.0.1:{self.ports[which]}"

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor", *args, "--run-dir", str(self.run_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )

    def status(self) -> dict[str, Any]:
        out = self.cli("status", "--json")
        if out.returncode != 0:
            raise BenchError(f"llama-runner status failed: {out.stderr}")
        return json.loads(out.stdout)

    def refresh_pids(self) -> dict[str, int]:
        """supervisor, gateway-ollama, gateway-openai, dashboard, worker, upstream (the worker's llama-server)."""
        doc = self.status()
        pids = {"supervisor": doc["pid"]}
        for p in doc["processes"]:
            name = p["name"]
            role = (
                "gateway-ollama"
                if "ollama" in name
                else "gateway-openai"
                if ("openai" in name or "lmstudio" in name)
                else "dashboard"
                if "dashboard" in name
                else name
            )
            if p["pid"]:
                pids[role] = p["pid"]
        for w in doc["workers"]:
            if w["name"] == self.upstream.model and w["state"] == "ready":
                pids["worker"], pids["upstream"] = w["pid"], w["backend_pid"]
        self.pids = pids
        return pids

    def worker_state(self) -> str:
        for w in self.status()["workers"]:
            if w["name"] == self.upstream.model:
                return str(w["state"])
        return "unknown"

    def upstream_port(self) -> int:
        """The port of the worker's own llama-server (direct access to the very same backend process)."""
        pid = self.pids.get("upstream")
        if not pid:
            raise BenchError("the worker's llama-server is not running")

        def listening() -> int:
            for c in psutil.Process(pid).net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    return int(c.laddr.port)
            return 0

        return int(wait_for(listening, 10, "the upstream's listening port"))

    def upstream_key(self) -> str:
        """The API key the worker gave its llama-server (workers/llama_server.py: ``k-<worker pid>.key`` in the run
        dir): direct access needs it, as a client's would (the synthetic upstream ignores it)."""
        path = self.run_dir / f"k-{self.pids.get('worker', 0)}.key"
        try:
            return path.read_text().strip()
        except OSError:
            return ""

    def stop_worker(self) -> None:
        out = self.cli("stop", self.upstream.model)
        if out.returncode != 0:
            raise BenchError(f"llama-runner stop failed: {out.stderr or out.stdout}")
        wait_for(lambda: self.worker_state() in ("stopped", "unknown"), 30, "the worker to stop", 0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(self.config_dir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for f in sorted((self.run_dir / "logs").glob("*")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-2000:])
        err = self.run_dir / "up.err"
        if err.exists():
            out.append("--- up.err\n" + err.read_text(errors="replace")[-2000:])
        return "\n".join(out)


def write_config(upstream: Upstream, cfg_dir: Path) -> None:
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["llama_server_path"] = upstream.binary
    app["models_root"] = None
    app["run_dir"] = None
    limits = app.setdefault("limits", {})
    limits.update(queue_size=1024, idle_ttl_s=-1, request_timeout_s=600, load_timeout_s=120)
    models = {
        "default_model": upstream.model,
        "models": {
            upstream.model: {
                "type": "llama",
                "model_path": upstream.model_path,
                "parameters": {
                    "ctx_size": upstream.ctx_size,
                    "threads": upstream.threads,
                    "parallel": upstream.parallel,
                    "cache_ram_mib": upstream.cache_ram_mib,
                    "extra_args": [],
                },
            }
        },
    }
    (cfg_dir / "app_config.json").write_text(json.dumps(app, indent=2))
    (cfg_dir / "models_config.json").write_text(json.dumps(models, indent=2))


def start_instance(upstream: Upstream) -> Instance:
    run_dir = Path(tempfile.mkdtemp(prefix="lr-bench-", dir="/tmp"))
    cfg_dir = Path(tempfile.mkdtemp(prefix="lr-bench-cfg-"))
    write_config(upstream, cfg_dir)
    ports = {"ollama": free_port(), "openai": free_port(), "dashboard": free_port()}
    argv = [
        sys.executable,
        "-m",
        "supervisor",
        "up",
        "--config-dir",
        str(cfg_dir),
        "--run-dir",
        str(run_dir),
        "--logs-dir",
        str(run_dir / "logs"),
        "--ollama-port",
        str(ports["ollama"]),
        "--lmstudio-port",
        str(ports["openai"]),
        "--dashboard-port",
        str(ports["dashboard"]),
    ]
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_SERVER"}  # the config's binary, not the user's
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(run_dir / "up.err", "wb"), env=env
    )
    inst = Instance(upstream, proc, run_dir, cfg_dir, ports)

    def gateways_up() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"llama-runner up exited: {inst.logs()}")
        try:
            urllib.request.urlopen(inst.url("ollama") + "/", timeout=1).read()
            urllib.request.urlopen(inst.url("openai") + "/v1/models", timeout=1).read()
            return True
        except OSError:
            return False

    try:
        wait_for(gateways_up, 60, "both gateways to answer", 0.05)
    except BaseException:
        inst.stop()
        raise
    return inst
