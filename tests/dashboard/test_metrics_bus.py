"""The public metrics bus, as another local app sees it, and the Prometheus endpoint, on the real system."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, System, wait_for
from tests.dashboard.conftest import MODEL_A


def _chat(system: System, model: str, max_tokens: int = 24, stream: bool = True,
          prompt: str = "Count to twenty.", ignore_eos: bool = False) -> bytes:
    body = json.dumps({"model": model, "stream": stream, "max_tokens": max_tokens, "ignore_eos": ignore_eos,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    req = urllib.request.Request(system.openai_url + "/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read()


class Lines:
    """Read a subprocess' stdout lines in a thread (no blocking reads in the test)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.q.put(line)

    def until(self, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for ev in self.seen:
            if cond(ev):
                return ev
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            ev = json.loads(line)
            self.seen.append(ev)
            if cond(ev):
                return ev
        raise AssertionError(f"timed out waiting for {what}; saw {[e.get('type') for e in self.seen][-30:]}")


@contextlib.contextmanager
def subscribed(system: System) -> Iterator[Lines]:
    """`llama-runner metrics` on the request and metrics topics, subscribed (its first periodic event came: no
    sleep for the slow joiner); stopped at the end."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "metrics", "--run-dir", str(system.run_dir),
                             "--topic", "request/", "--topic", "metrics/"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        lines = Lines(proc)
        lines.until(lambda e: e["type"] in ("system_metrics", "worker_metrics"), 15, "a first event")
        yield lines
    finally:
        proc.terminate()
        proc.wait(10)


def test_llama_runner_metrics_prints_request_and_worker_events(two_models: System) -> None:
    with subscribed(two_models) as lines:
        _chat(two_models, MODEL_A)
        phases = {}
        for phase in ("queued", "started", "first_token", "finished"):
            ev = lines.until(lambda e, p=phase: e["type"] == "request" and e["model"] == MODEL_A and e["phase"] == p,
                             15, f"request {phase}")
            phases[phase] = ev
        assert len({e["request_id"] for e in phases.values()}) == 1
        done = phases["finished"]
        assert done["status"] == 200 and done["outcome"] == "ok" and done["v"] == 1
        # which gateway and route it came through (path is the backend's: /api/chat showed as /v1/chat/completions)
        for ev in (phases["queued"], done):
            assert (ev["gateway"], ev["route"], ev["path"]) == ("openai", "/v1/chat/completions",
                                                                "/v1/chat/completions"), ev
        body = json.dumps({"model": MODEL_A, "stream": False, "options": {"num_predict": 2},
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{two_models.ollama_port}/api/chat",
                                                      data=body), timeout=120).read()
        ev = lines.until(lambda e: e["type"] == "request" and e["phase"] == "finished" and e.get("route") == "/api/chat",
                         15, "the Ollama request's end")
        assert ev["gateway"] == "ollama" and ev["path"] == "/v1/chat/completions", ev
        assert done["tokens"] > 0 and done["duration_s"] >= done["ttft_s"] > 0
        wm = lines.until(lambda e: e["type"] == "worker_metrics" and e["name"] == MODEL_A and e["tokens_total"] > 0,
                         10, "worker metrics counting the tokens")
        for key in ("pid", "state", "cpu_percent", "rss_bytes", "in_flight", "queued", "tokens_per_s",
                    "ttft_last_s", "ttft_p50_s", "errors_total", "uptime_s"):
            assert key in wm, key
        assert wm["ttft_last_s"] > 0 and wm["rss_bytes"] > 0 and wm["uptime_s"] > 0
        gm = lines.until(lambda e: e["type"] == "gateway_metrics" and e["protocol"] == "openai"
                         and e["requests_total"] >= 1, 10, "gateway metrics of the OpenAI gateway")
        assert {"requests_per_s", "errors_total", "open_streams"} <= gm.keys()


def test_a_ten_line_python_subscriber_sees_a_request(two_models: System) -> None:
    """The README's subscriber, as an external process: only pyzmq and json."""
    script = textwrap.dedent(f"""
        import json, zmq
        sub = zmq.Context().socket(zmq.SUB)
        sub.connect("ipc://{two_models.run_dir}/metrics.sock")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        while True:
            topic, body = sub.recv_multipart()
            event = json.loads(body)
            print(topic.decode(), json.dumps(event), flush=True)
            if event["type"] == "request" and event["phase"] == "finished":
                break
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        got: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                got.put(line)

        threading.Thread(target=pump, daemon=True).start()
        got.get(timeout=15)  # any event: it is subscribed
        _chat(two_models, MODEL_A, stream=False)
        assert proc.wait(30) == 0
        lines = [got.get_nowait() for _ in range(got.qsize())]
        finished = [json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.startswith("request/")]
        assert finished and finished[-1]["phase"] == "finished" and finished[-1]["tokens"] > 0
        assert lines[-1].startswith(f"request/{MODEL_A}/")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _scrape(system: System) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{system.dashboard_port}/metrics", timeout=10) as resp:
        ctype = resp.headers["Content-Type"]
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    return ctype, samples


def test_prometheus_endpoint_has_the_same_figures(two_models: System) -> None:
    _chat(two_models, MODEL_A)
    key = ("llama_runner_worker_tokens_generated_total", (("model", MODEL_A),))

    def counted() -> Any:
        _, samples = _scrape(two_models)
        return samples if samples.get(key, 0) > 0 else None

    samples = wait_for(counted, 15, "the tokens in /metrics")
    ctype, _ = _scrape(two_models)
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    assert samples[("llama_runner_worker_up", (("model", MODEL_A),))] == 1
    assert samples[("llama_runner_worker_state", (("model", MODEL_A), ("state", "ready")))] == 1
    assert samples[("llama_runner_worker_rss_bytes", (("model", MODEL_A),))] > 0
    assert samples[("llama_runner_worker_ttft_last_seconds", (("model", MODEL_A),))] > 0
    assert ("llama_runner_worker_restarts_total", (("model", MODEL_A),)) in samples
    assert samples.get(("llama_runner_gateway_requests_total", (("protocol", "openai"),)), 0) >= 1
    assert samples[("llama_runner_system_memory_total_bytes", ())] > 0
    assert all(name.startswith("llama_runner_") for name, _ in samples)


def test_a_stopped_worker_sends_its_last_figures_and_keeps_no_live_ones(two_models: System) -> None:
    """Its last figures were lost (the tokens of its last second never counted) and the last periodic ones stayed:
    "ready", its memory and uptime, on the bus and in /metrics, for a model long stopped."""
    from tests.dashboard.conftest import MODEL_B

    try:
        two_models.cli("start", MODEL_B)
        wait_for(lambda: two_models.worker(MODEL_B)["state"] == "ready", 60, "B ready")
        with subscribed(two_models) as lines:
            _chat(two_models, MODEL_B, max_tokens=4, stream=False)
            assert two_models.cli("stop", MODEL_B).returncode == 0
            last = lines.until(lambda e: e["type"] == "worker_metrics" and e["name"] == MODEL_B
                               and e["state"] == "stopped", 15, "B's last figures")
            assert last["tokens_total"] > 0 and last["requests_total"] >= 1 and last["rss_bytes"] == 0, last
        _, samples = _scrape(two_models)
        assert samples[("llama_runner_worker_state", (("model", MODEL_B), ("state", "stopped")))] == 1
        assert samples[("llama_runner_worker_rss_bytes", (("model", MODEL_B),))] == 0
        assert samples[("llama_runner_worker_uptime_seconds", (("model", MODEL_B),))] == 0
        assert samples[("llama_runner_worker_tokens_generated_total", (("model", MODEL_B),))] > 0
    finally:
        two_models.cli("start", MODEL_B)
        wait_for(lambda: two_models.worker(MODEL_B)["state"] == "ready", 60, "B ready again")


def test_a_request_cut_by_a_restart_is_an_error_not_a_cancellation(two_models: System) -> None:
    """The operator's restart ended it (the client got a 503 error): not 499 'cancelled', the client's doing."""
    from tests.dashboard.conftest import MODEL_B

    def long_chat() -> None:
        with contextlib.suppress(Exception):  # (cut short)
            _chat(two_models, MODEL_B, max_tokens=1000, prompt="Write a long story about a fox who lives in a forest.",
                  ignore_eos=True)

    try:
        with subscribed(two_models) as lines:
            t = threading.Thread(target=long_chat, daemon=True)
            t.start()
            lines.until(lambda e: e["type"] == "request" and e["model"] == MODEL_B and e["phase"] == "first_token",
                        60, "the stream under way")
            assert two_models.cli("restart", MODEL_B).returncode == 0
            done = lines.until(lambda e: e["type"] == "request" and e["model"] == MODEL_B
                               and e["phase"] == "finished", 30, "its end")
            assert (done["status"], done["outcome"]) == (503, "error"), done
            t.join(60)
    finally:
        wait_for(lambda: two_models.worker(MODEL_B)["state"] == "ready", 60, "B ready again")


def test_a_subscriber_gets_the_current_states_when_it_subscribes(two_models: System) -> None:
    """Process and worker states are sent on change: a subscriber that joined later (or again, after a supervisor
    restart: the processes' 'running' went out before its subscription came back) never learnt them."""
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "metrics", "--run-dir", str(two_models.run_dir),
                             "--topic", "state/"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        lines = Lines(proc)
        status = two_models.status()
        for p in status["processes"]:
            ev = lines.until(lambda e, p=p: e["type"] == "process_state" and e["name"] == p["name"], 15, p["name"])
            assert (ev["state"], ev["pid"]) == (p["state"], p["pid"]), ev
        for w in status["workers"]:
            ev = lines.until(lambda e, w=w: e["type"] == "worker_state" and e["name"] == w["name"], 15, w["name"])
            assert ev["state"] == w["state"], ev
    finally:
        proc.terminate()
        proc.wait(10)
