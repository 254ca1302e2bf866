"""Residency on the real system: keep_alive, load/unload requests, LRU eviction that spares busy workers,
and a client that goes away freeing its llama-server slot."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.conftest import (
    ROOT,
    System,
    require_runtime,
    running_system,
    start_system,
    stop_system,
    wait_for,
)

pytestmark = pytest.mark.e2e
A, B = "smollm2", "smollm2-b"


@pytest.fixture(scope="module")
def two_models() -> Iterator[System]:
    require_runtime()
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfg2-"))
    app = json.loads((ROOT / "config" / "app_config.json").read_text())
    app["limits"]["max_loaded_models"] = 1
    models = json.loads((ROOT / "config" / "models_config.json").read_text())
    base = models["models"][A]
    base["parameters"]["parallel"] = 1
    models["models"][B] = {**base, "aliases": []}
    (cfg / "app_config.json").write_text(json.dumps(app))
    (cfg / "models_config.json").write_text(json.dumps(models))
    with running_system(cfg, remove_config_dir=True) as sysm:
        yield sysm


def state(system: System, name: str) -> str:
    return system.worker(name)["state"]


def test_load_and_unload_requests(two_models: System) -> None:
    c = ollama.Client(two_models.ollama_url)
    r = c.generate(model=A, prompt="")
    assert r.done and r.done_reason == "load"
    assert state(two_models, A) == "ready"
    r = c.generate(model=A, prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert state(two_models, A) == "stopped"
    r = c.chat(model=A, messages=[])
    assert r.done and r.done_reason == "load"


def test_keep_alive_zero_unloads_after_the_request(two_models: System) -> None:
    c = ollama.Client(two_models.ollama_url)
    r = c.generate(model=A, prompt="Hi", keep_alive=0, options={"num_predict": 4})
    assert r.done and r.response is not None
    wait_for(lambda: state(two_models, A) == "stopped", 15, f"{A} unloaded after keep_alive 0")


def test_an_unload_lets_the_requests_under_way_finish(two_models: System) -> None:
    """Ollama's keep_alive 0 (`ollama stop`) from one client never breaks another client's request: the model
    unloads once it is done."""
    c = ollama.Client(two_models.ollama_url, timeout=120)
    c.generate(model=A, prompt="", keep_alive="5m")
    parts: list[ollama.GenerateResponse] = []
    failed: list[BaseException] = []

    def long_stream() -> None:
        try:
            for p in c.generate(model=A, prompt="Write a long story about a fox.", stream=True,
                                options={"num_predict": 48, "temperature": 0}):
                parts.append(p)
        except BaseException as exc:  # (ollama.ResponseError: the stream broke)
            failed.append(exc)

    t = threading.Thread(target=long_stream)
    t.start()
    wait_for(lambda: len(parts) >= 2 or failed, 60, "A streaming")
    r = c.generate(model=A, prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"
    t.join(60)
    assert not failed and parts[-1].done and parts[-1].done_reason in ("stop", "length")
    wait_for(lambda: state(two_models, A) == "stopped", 15, f"{A} unloaded once its stream ended")


def test_an_embedding_model_unloads_by_generate_keep_alive_zero(two_models: System) -> None:
    # what `ollama stop <model>` sends, whatever the model serves
    r = ollama.Client(two_models.ollama_url).generate(model="smollm2-embed", prompt="", keep_alive=0)
    assert r.done and r.done_reason == "unload"


def test_loading_another_model_evicts_the_idle_one(two_models: System) -> None:
    c = ollama.Client(two_models.ollama_url)
    c.generate(model=A, prompt="Hi", options={"num_predict": 2})
    assert state(two_models, A) == "ready"
    c.generate(model=B, prompt="Hi", options={"num_predict": 2})
    assert state(two_models, B) == "ready"
    assert state(two_models, A) == "stopped"


def test_busy_model_is_not_evicted_the_new_one_waits(two_models: System) -> None:
    c = ollama.Client(two_models.ollama_url, timeout=120)
    c.generate(model=A, prompt="", keep_alive="5m")  # A loaded
    parts: list[ollama.GenerateResponse] = []

    def long_stream() -> None:
        for p in c.generate(model=A, prompt="Count from one to one hundred.", stream=True,
                            options={"num_predict": 60, "temperature": 0}):
            parts.append(p)

    t = threading.Thread(target=long_stream)
    t.start()
    wait_for(lambda: len(parts) >= 2, 60, "A streaming")
    r = c.generate(model=B, prompt="Hi", options={"num_predict": 2})  # must wait for A, not kill it
    t.join(60)
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert r.done
    # B could only start after A's stream ended
    assert parts[-1].eval_count and parts[-1].eval_count > 2


def test_client_disconnect_frees_the_slot(two_models: System) -> None:
    c = ollama.Client(two_models.ollama_url, timeout=120)
    c.generate(model=A, prompt="", keep_alive="5m")
    body = {"model": A, "prompt": "Write a very long story about a dragon.", "stream": True,
            "options": {"num_predict": 2000, "temperature": 0.8}}
    with httpx.stream("POST", two_models.ollama_url + "/api/generate", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)
        next(lines)
    # the model has one slot: if the abandoned generation kept running, this would wait ~2000 tokens
    start = time.monotonic()
    r = c.generate(model=A, prompt="Hi", options={"num_predict": 3})
    assert r.done and time.monotonic() - start < 10


def test_lmstudio_ttl_unloads_after_idle(two_models: System) -> None:
    import openai

    c = openai.OpenAI(base_url=two_models.openai_url, api_key="x", max_retries=0, timeout=120)
    r = c.chat.completions.create(model=A, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                  extra_body={"ttl": 1})
    assert r.choices
    assert state(two_models, A) == "ready"
    wait_for(lambda: state(two_models, A) == "stopped", 15, f"{A} unloaded one second after its request")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=A, messages=[{"role": "user", "content": "Hi"}], extra_body={"ttl": "x"})


def test_a_load_nobody_waits_for_any_more_is_stopped(two_models: System) -> None:
    c = ollama.Client(two_models.ollama_url, timeout=60)
    c.generate(model=B, prompt="", keep_alive=0)  # B not loaded
    wait_for(lambda: state(two_models, B) == "stopped", 15, f"{B} stopped")
    # the client gives up while B is still loading (a fixed 0.3 s timeout: a fast host had B loaded by then)
    body = json.dumps({"model": B, "prompt": "Hi"}).encode()
    conn = socket.create_connection(("127.0.0.1", two_models.ollama_port))
    conn.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: state(two_models, B) == "starting", 15, f"{B} loading", interval=0.005)
    conn.close()
    wait_for(lambda: state(two_models, B) in ("stopping", "stopped"), 15, "the abandoned load stopped")
    wait_for(lambda: state(two_models, B) == "stopped", 15, f"{B} stopped")
    assert two_models.worker(B)["leases"] == 0


def test_preloaded_model_is_ready_without_a_request() -> None:
    require_runtime()
    cfg = Path(tempfile.mkdtemp(prefix="lr-cfg-pre-"))
    shutil.copy(ROOT / "config" / "app_config.json", cfg / "app_config.json")
    models = json.loads((ROOT / "config" / "models_config.json").read_text())
    models["preload"] = [A]
    (cfg / "models_config.json").write_text(json.dumps(models))
    sysm = start_system(cfg)
    try:
        wait_for(lambda: sysm.worker(A)["state"] == "ready", 60, f"{A} preloaded")
        assert sysm.worker("smollm2-embed")["state"] == "stopped"
    finally:
        sysm.status()
        assert stop_system(sysm) == 0
        shutil.rmtree(cfg, ignore_errors=True)
