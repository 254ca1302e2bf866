"""Smoke test of the benchmark: the synthetic upstream speaks llama-server's API, and the bench's quick mode on
tiny numbers writes a report with every figure. No timing assertions: targets live in the benchmark output."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_runtime

pytestmark = pytest.mark.timeout(300)


def test_synthetic_upstream_speaks_llama_server(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        str(ROOT / "tools" / "synthetic_upstream.py"),
        "-m",
        str(tmp_path / "x.gguf"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--alias",
        "syn",
        "-t",
        "1",
        "-c",
        "4096",
        "-np",
        "4",
        "--jinja",
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert "main: server is listening on http://127.0.0.1:" in line
        base = line.split("http://", 1)[1].split()[0]
        health = json.loads(urllib.request.urlopen(f"http://{base}/health", timeout=5).read())
        assert health == {"status": "ok"}

        def post(path: str, doc: dict[str, object]) -> bytes:
            req = urllib.request.Request(
                f"http://{base}{path}",
                data=json.dumps(doc).encode(),
                headers={"Content-Type": "application/json"},
            )
            return urllib.request.urlopen(req, timeout=5).read()

        body = post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5},
        )
        events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.strip()]
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == 5
        assert (
            chunks[-1]["choices"][0]["finish_reason"] == "length"
            and chunks[-1]["timings"]["predicted_n"] == 5
        )
        doc = json.loads(post("/v1/completions", {"prompt": "hi", "max_tokens": 3}))
        assert doc["usage"]["completion_tokens"] == 3 and doc["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_bench_quick_reports_every_figure(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.bench",
            "--quick",
            "--upstream",
            "synthetic",
            "--runs",
            "1",
            "--duration",
            "0",
            "--tokens",
            "8",
            "--samples",
            "3",
            "--rps-duration",
            "0.2",
            "--cold-runs",
            "1",
            "--idle-wait",
            "0",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    doc = json.loads((tmp_path / "BENCHMARKS.json").read_text())
    md = (tmp_path / "BENCHMARKS.md").read_text()
    for key in ("cpu", "logical_cores", "ram_gb", "python", "kernel"):
        assert doc["machine"][key], key
    r = doc["results"]["synthetic"]
    for c in ("1", "16", "64"):
        fig = r["streaming"][c]
        # (direct-unix: the worker's unix socket; one-hop-proxy: a plain aiohttp proxy in front of direct)
        for path in ("direct", "direct-unix", "one-hop-proxy", "ollama", "openai"):
            assert fig["tokens_per_s"][path]["n"] == 1 and fig["tokens_per_s"][path]["median"] > 0
        assert fig["tokens_per_stream_got"] == fig["tokens_per_stream"] == 8  # every stream carried what it asked
        assert fig["reference_ratio"]["n"] == 1 and "direct-unix" not in fig["ratio"]  # a reference, no target
        assert all(fig["ratio_to_reference"][g]["n"] == 1 for g in ("ollama", "openai"))
        assert fig["one_hop_ratio"]["n"] == 1 and "one-hop-proxy" not in fig["ratio"]
        assert "gateway" in fig["cpu_us_per_token"]["one-hop-proxy"]  # (the proxy's own CPU)
        for g in ("ollama", "openai"):
            assert fig["ratio"][g]["n"] == 1
            assert {"gateway", "worker", "upstream"} <= set(fig["cpu_us_per_token"][g])
    for key in ("ttft", "latency", "latency_back_to_back"):
        for p in ("p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms"):
            assert set(r[key][p]) >= {"ollama", "openai"}
    assert r["latency_back_to_back"]["p50_ms"]["direct-unix"]["median"] > 0
    assert r["latency_back_to_back"]["added_p50_ms"]["one-hop-proxy"]["n"] == 1
    for ref in ("direct-unix", "one-hop-proxy"):
        assert ref not in r["latency"]["p50_ms"]  # (the targets' interleaving stays as it was)
    assert set(r["rps"]["ratio"]) == {"ollama", "openai", "direct-unix", "one-hop-proxy"}
    assert r["rps"]["requests_per_s"]["direct"]["median"] > 0
    floor = r["bus_floor"]  # (a round trip through pyzmq and over a unix socket, measured in the same run)
    assert all(floor["rtt_p50_us"][k]["n"] == 1 and floor["rtt_p50_us"][k]["median"] > 0 for k in ("zmq", "unix"))
    assert floor["zmq_minus_unix_us"]["n"] == 1
    for role in ("supervisor", "gateway-ollama", "gateway-openai", "dashboard", "worker"):
        assert r["idle_rss"]["rss_mb"][role] > 0, role
    assert r["idle_rss"]["total_ours_rss_mb"] > 0
    cold = r["cold_start"]
    assert cold["direct_load_ms"]["n"] == 1 and cold["direct_first_token_ms"]["median"] > 0
    assert all(cold["first_token_ms"][g]["median"] > 0 for g in ("ollama", "openai"))
    names = {t["target"] for t in doc["targets"]}
    assert not any("unix" in n or "one-hop" in n for n in names)  # references, no targets
    assert any("tokens/s" in n for n in names) and any("added latency" in n for n in names)
    assert any("requests/s" in n for n in names) and any("idle RSS" in n for n in names)
    for needle in (
        "## Targets",
        "streaming tokens/s, 64 stream(s)",
        "TTFT, warm p99",
        "back to back (not a target) p50",
        "requests/s, concurrency 32",
        "cold start",
        "CPU µs per token",
        "Idle RSS",
        "Machine:",
        "unix (reference)",
        "one-hop (reference)",
        "Bus floor",
    ):
        assert needle in md, needle
    assert "reference: tokens/s over llama-server's unix socket" in out.stdout
    assert "reference: tokens/s gateway / llama-server's unix socket: 1 streams ollama" in out.stdout
    assert "gateway / unix reference" in md
    assert "reference: a plain one-hop aiohttp proxy adds" in out.stdout
    assert "bus floor: round trip p50" in out.stdout
    assert "PASS" in out.stdout or "MISS" in out.stdout
    # what the README says it prints: each process' CPU per token and idle RSS (they were only in the .md)
    assert "CPU µs per token at 16 streams: ollama: gateway" in out.stdout
    assert "idle RSS MB: supervisor" in out.stdout
    # 3 requests a run: a "p99" is their maximum, judged n/a, neither PASS nor MISS (a negative one passed)
    p99 = [t for t in doc["targets"] if "p99" in t["target"]]
    assert p99 and all(t["status"] == "n/a" and not t["pass"] for t in p99), p99
    assert any(line.split()[:3] == ["n/a", "[synthetic]", "added"] and "p99" in line
               for line in out.stdout.splitlines()), out.stdout
    assert r["latency_back_to_back"]["samples_per_run"] == 3  # (it said 3 and measured 20)
    json.loads((tmp_path / "BENCHMARKS.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


@pytest.mark.parametrize(("args", "says"), [
    (["--runs", "0"], "must be 1 or more"),
    (["--duration", "-1"], "must be 0 or more"),
    (["--baseline", "/nonexistent/BENCHMARKS.json"], "--baseline"),
    (["--baseline", "README.md"], "--baseline"),
    (["--out-dir", "README.md"], "not a folder"),
])
def test_bad_arguments_are_refused_before_anything_runs(args: list[str], says: str) -> None:
    """A bad --baseline or --out-dir was found after the whole run (15 minutes) and threw its results away."""
    out = subprocess.run([sys.executable, "-m", "tools.bench", "--quick", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2 and says in out.stderr, out.stderr


def test_sigterm_stops_the_benchmark_and_what_it_started(tmp_path: Path) -> None:
    """SIGTERM (a CI timeout, kill) left the supervisor, gateways, worker and upstream running, and temp dirs."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "tools.bench", "--quick", "--upstream", "synthetic", "--runs", "1",
                             "--duration", "5"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "tokens/s c=1 run" in line or "tokens/s" in line:  # the instance is up and loaded
                break
        started = psutil.Process(proc.pid).children(recursive=True)
        assert started
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[1]
        assert proc.returncode == 130 and "interrupted" in rest, rest[-2000:]
        time.sleep(0.5)
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [p.cmdline() for p in left]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_quick_on_the_real_model_reaches_llama_server_directly(tmp_path: Path) -> None:
    """A worker's llama-server wants the key its worker gave it: the benchmark's direct path (and the references in
    front of it) must send it, or the real model's run stops at its first request (401)."""
    require_runtime()
    out = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", "--upstream", "real", "--runs", "1", "--duration", "0",
         "--samples", "2", "--rps-duration", "0.2", "--cold-runs", "1", "--idle-wait", "0", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads((tmp_path / "BENCHMARKS.json").read_text())["results"]["real"]
    assert r["latency"]["p50_ms"]["direct"]["median"] > 0
    assert r["streaming"]["1"]["tokens_per_s"]["direct"]["median"] > 0


def test_direct_llama_server_gets_the_argv_a_worker_gives_it(tmp_path: Path) -> None:
    """The benchmark's 'direct' llama-server must run as the workers' does, or the ratios compare two servers."""
    from bus.protocol import ModelParams, WorkerLaunch
    from config.schema import ModelConfig
    from tools.bench.instance import Upstream
    from workers.llama_server import build_argv

    up = Upstream("real", "/bin/llama-server", str(tmp_path / "m.gguf"), "m", threads=1, ctx_size=1024, parallel=2)
    model = ModelConfig(model_path=up.model_path)
    launch = WorkerLaunch(name="m", kind="llama", run_dir="", logs_dir="", supervisor_pid=1, model_path=up.model_path,
                          llama_server=up.binary,
                          params=ModelParams(ctx_size=1024, threads=1, parallel=2, extra_args=model.backend_args()))
    assert up.argv() == build_argv(launch)


def test_failed_streams_are_told_by_path() -> None:
    """10 failed streams in a run: were they llama-server's own (it drops connections at 64) or the proxy's?"""
    from tools.bench.report import failed_paths

    r = {"streaming": {"1": {"errors": 2}, "64": {"errors": 9, "errors_by_path": {"direct": 9}}},
         "rps": {"errors": 1, "errors_by_path": {"ollama": 1}}}
    assert failed_paths(r) == "direct 9, ollama 1, one stream at a time 2"
