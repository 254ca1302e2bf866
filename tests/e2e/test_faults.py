"""Faults on the real system: every one ends in a clean error or a recovery, never a hang."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import ollama
import openai
import pytest
import zmq

from bus import endpoints
from tests.conftest import (
    ROOT,
    System,
    alive,
    require_runtime,
    running_system,
    start_system,
    stop_system,
    wait_for,
)

pytestmark = pytest.mark.e2e
A, B = "smollm2", "smollm2-b"
LONG_PROMPT = "Write a very long story about a dragon and a knight, with many chapters."


def two_model_config(**limits: Any) -> Path:
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfg-f-"))
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["limits"].update(limits)
    models = json.loads((ROOT / "config" / "models_config.json").read_text())
    base = {**models["models"][A], "aliases": []}
    base["parameters"] = {**base["parameters"], "parallel": 1}
    models["models"] = {A: base, B: dict(base)}
    (cfg / "app_config.json").write_text(json.dumps(app))
    (cfg / "models_config.json").write_text(json.dumps(models))
    return cfg


@pytest.fixture(scope="module")
def faulty() -> Iterator[System]:
    require_runtime()
    with running_system(two_model_config(max_loaded_models=2, queue_size=8, restart_backoff_s=0.2),
                        remove_config_dir=True) as sysm:
        yield sysm


class Stream(threading.Thread):
    """A streaming request in the background; records chunks, the end, or the error."""

    def __init__(self, system: System, model: str, api: str = "ollama", tokens: int = 120) -> None:
        super().__init__(daemon=True)
        self.system, self.model, self.api, self.tokens = system, model, api, tokens
        self.chunks: list[Any] = []
        self.error: BaseException | None = None
        self.done = False
        self.ended_at = 0.0

    def run(self) -> None:
        try:
            if self.api == "ollama":
                c = ollama.Client(self.system.ollama_url, timeout=120)
                for p in c.generate(model=self.model, prompt=LONG_PROMPT, stream=True,
                                    options={"num_predict": self.tokens, "temperature": 0.7, "seed": 7}):
                    self.chunks.append(p)
                self.done = bool(self.chunks and self.chunks[-1].done)
            else:
                c = openai.OpenAI(base_url=self.system.openai_url, api_key="x", max_retries=0, timeout=120)
                for ch in c.chat.completions.create(model=self.model, stream=True, max_tokens=self.tokens,
                                                    messages=[{"role": "user", "content": LONG_PROMPT}],
                                                    extra_body={"ignore_eos": True}):
                    self.chunks.append(ch)
                self.done = any(ch.choices and ch.choices[0].finish_reason for ch in self.chunks)
        except BaseException as exc:  # recorded for the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def wait_streaming(self, n: int = 2) -> None:
        wait_for(lambda: len(self.chunks) >= n or self.error is not None, 120, f"{self.model} streaming")
        assert self.error is None, self.error


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def loaded(system: System, name: str) -> dict[str, Any]:
    # (a test before may have killed a gateway: it is back after its backoff)
    wait_for(lambda: _answers(system.ollama_url + "/api/version"), 60, "the Ollama gateway answering")
    c = ollama.Client(system.ollama_url, timeout=120)
    c.generate(model=name, prompt="", keep_alive="10m")
    w = system.worker(name)
    assert w["state"] == "ready"
    return w


def test_worker_killed_mid_stream_errors_cleanly_other_stream_continues(faulty: System) -> None:
    wa = loaded(faulty, A)
    loaded(faulty, B)
    sa, sb = Stream(faulty, A, "ollama", 400), Stream(faulty, B, "openai", 60)
    sa.start()
    sb.start()
    sa.wait_streaming()
    sb.wait_streaming()
    killed = time.monotonic()
    os.kill(wa["pid"], signal.SIGKILL)
    sa.join(30)
    assert not sa.is_alive(), "the client of the killed worker hangs"
    assert isinstance(sa.error, ollama.ResponseError), sa.error
    assert sa.ended_at - killed < 10
    sb.join(120)
    assert sb.error is None and sb.done, sb.error
    r = ollama.Client(faulty.ollama_url, timeout=120).generate(model=A, prompt="Hi", options={"num_predict": 2})
    assert r.done


def test_llama_server_killed_mid_stream_errors_cleanly(faulty: System) -> None:
    wa = loaded(faulty, A)
    s = Stream(faulty, A, "openai", 400)
    s.start()
    s.wait_streaming()
    os.kill(wa["backend_pid"], signal.SIGKILL)
    s.join(30)
    assert not s.is_alive() and s.error is not None and not s.done
    r = ollama.Client(faulty.ollama_url, timeout=120).generate(model=A, prompt="Hi", options={"num_predict": 2})
    assert r.done


def test_a_request_sent_as_llama_server_dies_runs_once_on_the_restarted_worker(faulty: System) -> None:
    """It ran twice: the gateway sent it again to the new worker, and the job it had queued for the dead one was
    delivered there too (the same address: ZeroMQ sends what it holds when it reconnects), a slot held by an
    answer nobody read."""
    import contextlib

    import httpx

    from tests.dashboard.test_metrics_bus import subscribed

    wa = loaded(faulty, A)
    with subscribed(faulty) as lines:
        os.kill(wa["backend_pid"], signal.SIGKILL)
        r = httpx.post(faulty.openai_url + "/chat/completions", timeout=120, json={
            "model": A, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "ignore_eos": True})
        assert r.status_code == 200, r.text
        with contextlib.suppress(AssertionError):  # (a second run would have started by now)
            lines.until(lambda e: False, 3, "")
    started = [e["request_id"] for e in lines.seen
               if e["type"] == "request" and e["model"] == A and e["phase"] == "started"]
    assert len(started) == 1, started
    wait_for(lambda: faulty.worker(A)["state"] == "ready", 60, "the model ready")


def test_a_request_under_way_when_llama_server_dies_is_not_sent_again(faulty: System) -> None:
    """A non-streaming request llama-server was answering when it died gets its error; it was sent to the
    restarted worker (its head had not come: "never started") and answered 20 s later, so a prompt that crashes
    llama-server was replayed, pushing the model towards fatal. (Queued ones are still sent on: nothing ran.)"""
    import httpx

    wa = loaded(faulty, A)
    result: dict[str, Any] = {}

    def ask() -> None:
        r = httpx.post(faulty.openai_url + "/chat/completions", timeout=120, json={
            "model": A, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 400,
            "ignore_eos": True})
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(1.0)  # (generating by now: 400 tokens take several seconds)
    os.kill(wa["backend_pid"], signal.SIGKILL)
    t.join(60)
    assert result["status"] == 502, result  # (whichever comes first: the connection's end or the worker's word)
    assert result["body"]["error"]["code"] in ("backend_error", "backend_exited_under_way"), result
    wait_for(lambda: faulty.worker(A)["state"] == "ready", 60, "the model restarted after the crash")


def test_restart_of_one_model_leaves_the_other_stream_alone(faulty: System) -> None:
    loaded(faulty, A)
    wb = loaded(faulty, B)
    s = Stream(faulty, B, "ollama", 80)
    s.start()
    s.wait_streaming()
    out = faulty.cli("restart", A)
    assert out.returncode == 0, out.stderr
    s.join(120)
    assert s.error is None and s.done
    assert faulty.worker(B)["pid"] == wb["pid"]


def test_gateway_killed_is_restarted_other_gateway_unaffected(faulty: System) -> None:
    loaded(faulty, B)
    gw = next(p for p in faulty.status()["processes"] if p["name"] == "gateway-ollama")
    s = Stream(faulty, B, "openai", 60)
    s.start()
    s.wait_streaming()
    os.kill(gw["pid"], signal.SIGKILL)

    def back() -> bool:
        p = next(p for p in faulty.status()["processes"] if p["name"] == "gateway-ollama")
        if p["pid"] == gw["pid"] or p["state"] != "running":
            return False
        try:
            ollama.Client(faulty.ollama_url, timeout=5).list()
            return True
        except Exception:
            return False

    wait_for(back, 30, "ollama gateway restarted", interval=0.2)
    s.join(120)
    assert s.error is None and s.done


def test_many_clients_on_one_slot_complete_or_get_429(faulty: System) -> None:
    loaded(faulty, A)
    results: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        c = openai.OpenAI(base_url=faulty.openai_url, api_key="x", max_retries=0, timeout=180)
        try:
            c.chat.completions.create(model=A, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
            outcome = "ok"
        except openai.RateLimitError:
            outcome = "429"
        except Exception as exc:
            outcome = f"error: {exc!r}"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 64, "some requests hang"
    assert set(results) <= {"ok", "429"}, results
    assert results.count("ok") >= 9 and results.count("429") >= 1
    r = ollama.Client(faulty.ollama_url, timeout=60).generate(model=A, prompt="Hi", options={"num_predict": 2})
    assert r.done


def test_malformed_bus_messages_are_dropped(faulty: System) -> None:
    w = loaded(faulty, A)
    ctx = zmq.Context()
    try:
        for ep in (endpoints.control(faulty.run_dir), endpoints.worker(faulty.run_dir, A, w["pid"])):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.connect(ep)
            for frames in ([b"garbage"], [b"\x81\xa4type\xa4nope"], [b"a", b"b", b"c"],
                           [msgspec.msgpack.encode({"type": "http", "request_id": 5})], [b""]):
                s.send_multipart(frames)
            s.close()
        pub = ctx.socket(zmq.PUB)
        pub.linger = 0
        pub.connect(endpoints.metrics_in(faulty.run_dir))
        pub.send_multipart([b"state/worker/" + A.encode() + b"/", b"not json"])
        pub.close()
    finally:
        ctx.term()
    status = faulty.status()
    assert all(p["state"] == "running" for p in status["processes"])
    assert faulty.worker(A)["pid"] == w["pid"]
    r = ollama.Client(faulty.ollama_url, timeout=60).generate(model=A, prompt="Hi", options={"num_predict": 2})
    assert r.done


def test_sigterm_lets_in_flight_stream_finish() -> None:
    require_runtime()
    sysm = start_system()
    loaded(sysm, A)
    sysm.status()
    tree = {p.pid for p in sysm.descendants()} | sysm.seen_pids
    s = Stream(sysm, A, "ollama", 40)
    s.start()
    s.wait_streaming()
    assert stop_system(sysm) == 0
    s.join(30)
    assert s.error is None and s.done, s.error
    wait_for(lambda: not alive(tree), 10, "no process left")


def test_leases_of_a_killed_gateway_are_released(faulty: System) -> None:
    loaded(faulty, B)
    gw = next(p for p in faulty.status()["processes"] if p["name"] == "gateway-ollama")
    s = Stream(faulty, B, "ollama", 400)
    s.start()
    s.wait_streaming()
    assert faulty.worker(B)["leases"] == 1
    os.kill(gw["pid"], signal.SIGKILL)
    s.join(30)
    assert not s.is_alive() and not s.done  # the connection is gone with the gateway
    wait_for(lambda: faulty.worker(B)["leases"] == 0, 20, "the dead gateway's lease released")
    # the slot it held is free again: a one-slot model answers promptly
    start = time.monotonic()
    r = openai.OpenAI(base_url=faulty.openai_url, api_key="x", max_retries=0, timeout=60).chat.completions.create(
        model=B, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices and time.monotonic() - start < 15


def test_a_responses_stream_cut_by_a_crash_ends_with_the_responses_apis_events(faulty: System) -> None:
    """The openai SDK reads an error event and response.failed (it got a chat completion's error chunk)."""
    import threading

    wa = loaded(faulty, A)
    c = openai.OpenAI(base_url=faulty.openai_url, api_key="x", max_retries=0, timeout=120)
    kinds: list[str] = []
    streaming = threading.Event()

    def read() -> None:
        for ev in c.responses.create(model=A, input=LONG_PROMPT, max_output_tokens=400, stream=True,
                                     extra_body={"ignore_eos": True}):
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                streaming.set()

    t = threading.Thread(target=read)
    t.start()
    assert streaming.wait(60), "streaming"
    os.kill(wa["backend_pid"], signal.SIGKILL)
    t.join(60)
    assert kinds[-2:] == ["error", "response.failed"], kinds[-5:]
    wait_for(lambda: faulty.worker(A)["state"] == "ready", 60, "the model restarted after the crash")


def test_a_client_that_gives_up_and_asks_again_at_once_is_not_refused_as_queue_full() -> None:
    """Its first request's place frees as that job unwinds, a moment after the cancel: the new one came first and
    met a full queue (Open WebUI's stop-then-send got 429s/503s at exactly the model's capacity)."""
    import concurrent.futures

    import httpx

    from tests.conftest import start_system, stop_system

    sysm = start_system(two_model_config(queue_size=1))
    body = {"model": A, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 300,
            "ignore_eos": True, "stream": True}
    try:
        loaded(sysm, A)
        refused = 0
        with httpx.Client(timeout=60) as c, concurrent.futures.ThreadPoolExecutor(1) as pool:
            for _ in range(3):
                first = c.stream("POST", sysm.openai_url + "/chat/completions", json=body)
                r = first.__enter__()
                lines = r.iter_lines()
                next(lines)  # (it has the slot)
                queued = pool.submit(httpx.post, sysm.openai_url + "/chat/completions", timeout=60,
                                     json={**body, "stream": False, "max_tokens": 20})
                time.sleep(0.5)  # (the queue's one place taken)
                first.__exit__(None, None, None)  # the client gives up...
                again = c.post(sysm.openai_url + "/chat/completions", json={**body, "stream": False, "max_tokens": 5})
                refused += again.status_code == 429
                assert queued.result(60).status_code == 200
        assert refused == 0, refused
    finally:
        stop_system(sysm)


def test_a_model_that_crashes_soon_after_each_load_ends_fatal(faulty: System) -> None:
    """Its llama-server killed each time it was ready (the OOM killer at every first request): its failures were
    counted from 0 again at each ready, so it was restarted every second, forever; now only a run of
    ``stable_s`` (30 s) starts the count again, and max_restarts (5) crashes in a row make it fatal."""
    assert faulty.cli("start", B).returncode == 0
    pids: set[int] = set()
    for _ in range(5):
        w = wait_for(lambda: (w := faulty.worker(B))["state"] in ("ready", "fatal") and w["backend_pid"] not in pids
                     and w, 60, f"{B} ready again")
        assert w["state"] == "ready", w
        pids.add(w["backend_pid"])
        os.kill(w["backend_pid"], signal.SIGKILL)
    w = wait_for(lambda: (w := faulty.worker(B))["state"] == "fatal" and w, 30, f"{B} fatal")
    assert "5 failures in a row" in w["message"], w
    assert faulty.worker(A)["state"] != "fatal"
    assert faulty.cli("start", B).returncode == 0  # (an operator's start clears it)
    wait_for(lambda: faulty.worker(B)["state"] == "ready", 60, f"{B} started again")
    assert faulty.cli("stop", B).returncode == 0


def test_crashes_between_clean_unloads_do_not_add_up_to_fatal(faulty: System) -> None:
    """A model loaded and unloaded often, its llama-server killed now and then (an OOM kill on a busy machine):
    five such crashes over many clean unload/load cycles made it fatal for good. A clean stop ends a row."""
    c = ollama.Client(faulty.ollama_url, timeout=120)
    for _ in range(6):
        c.generate(model=B, prompt="", keep_alive="10m")
        w = faulty.worker(B)
        os.kill(w["backend_pid"], signal.SIGKILL)
        gone = w["pid"]
        wait_for(lambda gone=gone: (x := faulty.worker(B))["state"] == "ready" and x["pid"] != gone, 60, "B back")
        c.generate(model=B, prompt="", keep_alive=0)  # (a clean unload)
        wait_for(lambda: faulty.worker(B)["state"] == "stopped", 30, "B unloaded")
    assert c.generate(model=B, prompt="Hi", options={"num_predict": 2}).done
    assert faulty.worker(B)["state"] == "ready"
