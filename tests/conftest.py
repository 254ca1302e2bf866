"""Shared test helpers: free ports, waiting on conditions (no fixed sleeps), the real system under test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

# CI runs the property tests with a fixed seed so that main stays green on a given commit; locally they explore.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def llama_server_available() -> bool:
    from config import runtime
    from config.loader import load_config

    cfg = load_config()
    model = cfg.models.models[cfg.models.default_model or ""]
    return runtime.find_llama_server(cfg.app.llama_server_path) is not None and cfg.model_path(model).exists()


@dataclass
class System:
    """A running `llama-runner up` on free ports with a private run dir."""

    proc: subprocess.Popen[bytes]
    run_dir: Path
    config_dir: Path
    logs_dir: Path
    ollama_port: int
    openai_port: int
    dashboard_port: int
    seen_pids: set[int] = field(default_factory=set)

    @property
    def ollama_url(self) -> str:
        return f"http://127.0.0.1:{self.ollama_port}"

    @property
    def openai_url(self) -> str:
        return f"http://127.0.0.1:{self.openai_port}/v1"

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor", *args, "--run-dir", str(self.run_dir)],
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)

    def status(self) -> dict[str, Any]:
        import json

        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        for w in doc["workers"]:
            self.seen_pids.update(p for p in (w["pid"], w["backend_pid"]) if p)
        for p in doc["processes"]:
            if p["pid"]:
                self.seen_pids.add(p["pid"])
        return doc

    def worker(self, name: str) -> dict[str, Any]:
        return next(w for w in self.status()["workers"] if w["name"] == name)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def logs(self) -> str:
        out = []
        for f in sorted(self.logs_dir.glob("*")):
            try:
                out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
            except OSError:
                pass
        return "\n".join(out)


def start_system(config_dir: Path | None = None, extra_env: dict[str, str] | None = None,
                 ollama_port: int | None = None, wait: bool = True) -> System:
    run_dir = Path(tempfile.mkdtemp(prefix="lr-", dir="/tmp"))
    cfg_dir = Path(tempfile.mkdtemp(prefix="lr-cfg-"))
    for name in ("app_config.json", "models_config.json"):
        shutil.copy((config_dir or ROOT / "config") / name, cfg_dir / name)
    logs_dir = run_dir / "logs"
    ports = [ollama_port or free_port(), free_port(), free_port()]
    argv = [sys.executable, "-m", "supervisor", "up", "--config-dir", str(cfg_dir), "--run-dir", str(run_dir),
            "--logs-dir", str(logs_dir), "--ollama-port", str(ports[0]), "--lmstudio-port", str(ports[1]),
            "--dashboard-port", str(ports[2])]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(run_dir / "up.err", "wb"),
                            env={**os.environ, **(extra_env or {})})
    system = System(proc, run_dir, cfg_dir, logs_dir, *ports)
    import urllib.error
    import urllib.request

    urls = [system.ollama_url + "/", system.openai_url + "/models"]
    if json.loads((cfg_dir / "app_config.json").read_text()).get("dashboard", {}).get("enabled", True):
        urls.append(f"http://127.0.0.1:{system.dashboard_port}/api/status")

    def gateways_up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"llama-runner up exited: {(run_dir / 'up.err').read_text()}")
        try:
            for url in urls:
                try:
                    urllib.request.urlopen(url, timeout=1).read()
                except urllib.error.HTTPError:  # an answer (401 with api_keys configured): it is up
                    pass
            return True
        except OSError:
            return False

    if wait:
        wait_for(gateways_up, 60, "both gateways and the dashboard to answer")
    return system


def stop_system(system: System, timeout: float = 30) -> int:
    """SIGTERM the supervisor (as Ctrl-C would) and wait; returns its exit code."""
    with_pids = set(system.seen_pids)
    system.proc.send_signal(signal.SIGINT)
    try:
        code = system.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        system.proc.kill()
        code = system.proc.wait()
        raise AssertionError("supervisor did not stop within 30s:\n" + system.logs()) from None
    system.seen_pids = with_pids
    return code


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.Error:
            pass
    return out


def require_runtime() -> None:
    """Skip without llama-server and the default model; under CI their absence is a failure, not a skip."""
    if not llama_server_available():
        if os.environ.get("CI"):
            pytest.fail("llama-server or the default model is missing: run `make setup`")
        pytest.skip("llama-server or the default model is missing: run `make setup`")


@contextlib.contextmanager
def running_system(config_dir: Path | None = None, *, remove_config_dir: bool = False) -> Iterator[System]:
    """A system for a fixture: started, then stopped with exit code 0 and no process of it left behind."""
    require_runtime()
    sysm = start_system(config_dir)
    try:
        yield sysm
    finally:
        if sysm.proc.poll() is None:
            sysm.status()
            code = stop_system(sysm)
            assert code == 0, sysm.logs()
            wait_for(lambda: not alive(sysm.seen_pids), 10, "no process of the instance left")
        shutil.rmtree(sysm.run_dir, ignore_errors=True)
        shutil.rmtree(sysm.config_dir, ignore_errors=True)
        if remove_config_dir and config_dir is not None:
            shutil.rmtree(config_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    with running_system() as sysm:
        yield sysm
