"""Config hot reload on the real system: only changed workers restart; added models appear; removed ones
are drained, then stopped."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from config.loader import load_config
from tests.conftest import (
    ROOT,
    System,
    running_system,
    wait_for,
)
from tests.e2e.test_faults import Stream

pytestmark = pytest.mark.e2e
A, B, C = "smollm2", "smollm2-b", "smollm2-c"


def models_file(system: System) -> Path:
    return system.config_dir / "models_config.json"


def write_models(system: System, entries: dict[str, Any]) -> None:
    doc = json.loads(models_file(system).read_text())
    doc["models"] = entries
    doc.pop("preload", None)
    models_file(system).write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def reloadable() -> Iterator[tuple[System, dict[str, Any]]]:
    base = json.loads((ROOT / "config" / "models_config.json").read_text())["models"][A]
    base = {**base, "aliases": [], "parameters": {**base["parameters"], "parallel": 1}}
    with running_system() as sysm:
        yield sysm, base


def names(system: System) -> list[str]:
    return sorted((m.model or "").removesuffix(":latest") for m in ollama.Client(system.ollama_url).list().models)


def test_reload_restarts_only_changed_and_adds_new(reloadable: tuple[System, dict[str, Any]]) -> None:
    system, base = reloadable
    write_models(system, {A: base, B: base})
    assert system.cli("reload").returncode == 0
    c = ollama.Client(system.ollama_url, timeout=120)
    c.generate(model=A, prompt="", keep_alive="10m")
    c.generate(model=B, prompt="", keep_alive="10m")
    pa, pb = system.worker(A)["pid"], system.worker(B)["pid"]
    changed = {**base, "parameters": {**base["parameters"], "ctx_size": 1024}}
    write_models(system, {A: base, B: changed, C: base})
    out = system.cli("reload")
    assert out.returncode == 0 and "added: " + C in out.stdout and "changed: " + B in out.stdout, out
    wait_for(lambda: system.worker(B)["state"] == "ready" and system.worker(B)["pid"] != pb, 60, "B restarted")
    assert system.worker(A)["pid"] == pa  # unchanged: untouched
    wait_for(lambda: C in names(system), 10, "C listed by the gateway")
    assert c.generate(model=C, prompt="Hi", options={"num_predict": 2}).done


def test_removed_model_is_drained_then_stopped(reloadable: tuple[System, dict[str, Any]]) -> None:
    system, base = reloadable
    write_models(system, {A: base, B: base, C: base})
    assert system.cli("reload").returncode == 0
    ollama.Client(system.ollama_url, timeout=120).generate(model=C, prompt="", keep_alive="10m")
    s = Stream(system, C, "ollama", 60)
    s.start()
    s.wait_streaming()
    write_models(system, {A: base, B: base})
    out = system.cli("reload")
    assert out.returncode == 0 and "removed: " + C in out.stdout
    s.join(120)
    assert s.error is None and s.done, s.error  # the in-flight stream was let finish
    wait_for(lambda: C not in [w["name"] for w in system.status()["workers"]], 30, "C gone")
    wait_for(lambda: C not in names(system), 10, "C no longer listed")
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(system.ollama_url).generate(model=C, prompt="Hi")
    assert err.value.status_code == 404


def test_a_removed_model_is_refused_at_once_while_its_last_stream_drains(
        reloadable: tuple[System, dict[str, Any]]) -> None:
    """The Ollama port went on serving it (its shared lease answered without asking the supervisor) until the
    drain ended, and kept the drain going with every new request."""
    system, base = reloadable
    write_models(system, {A: base, C: base})
    assert system.cli("reload").returncode == 0
    c = ollama.Client(system.ollama_url, timeout=120)
    c.generate(model=C, prompt="Hi", options={"num_predict": 2})  # (the gateway holds a shared lease on C now)
    s = Stream(system, C, "ollama", 400)
    s.start()
    s.wait_streaming()
    write_models(system, {A: base})
    assert system.cli("reload").returncode == 0
    time.sleep(0.5)  # (the reload's event reaches the gateways)
    with pytest.raises(ollama.ResponseError) as err:
        c.generate(model=C, prompt="Hi", options={"num_predict": 2})
    assert err.value.status_code == 404 and s.is_alive()
    s.join(120)
    assert s.error is None and s.done, s.error


def test_a_model_removed_then_added_back_while_it_drains_stays(reloadable: tuple[System, dict[str, Any]]) -> None:
    """Removed while a stream ran, added back before it ended ("no change": it was still there): the end of the
    drain took it away all the same, a 404 for a model in the config until a later reload."""
    system, base = reloadable
    write_models(system, {A: base, C: base})
    assert system.cli("reload").returncode == 0
    s = Stream(system, C, "ollama", 400)
    s.start()
    s.wait_streaming()
    write_models(system, {A: base})
    assert "removed: " + C in system.cli("reload").stdout
    write_models(system, {A: base, C: base})
    assert system.cli("reload").returncode == 0
    s.join(120)
    assert s.error is None and s.done, s.error
    time.sleep(1)  # (the drain's end)
    assert C in [w["name"] for w in system.status()["workers"]]
    assert ollama.Client(system.ollama_url, timeout=120).generate(model=C, prompt="Hi",
                                                                  options={"num_predict": 2}).done


def test_a_changed_model_finishes_its_stream_then_restarts(reloadable: tuple[System, dict[str, Any]]) -> None:
    system, base = reloadable
    write_models(system, {A: base, B: base})
    assert system.cli("reload").returncode == 0
    ollama.Client(system.ollama_url, timeout=120).generate(model=B, prompt="", keep_alive="10m")
    pb = system.worker(B)["pid"]
    s = Stream(system, B, "ollama", 60)
    s.start()
    s.wait_streaming()
    write_models(system, {A: base, B: {**base, "parameters": {**base["parameters"], "ctx_size": 1536}}})
    out = system.cli("reload")
    assert out.returncode == 0 and "changed: " + B in out.stdout, out
    s.join(120)
    assert s.error is None and s.done, s.error  # the stream under way was let finish (it was cut at once)
    wait_for(lambda: system.worker(B)["state"] == "ready" and system.worker(B)["pid"] != pb, 60,
             "B restarted with its new settings")


def test_limits_apply_at_a_reload(reloadable: tuple[System, dict[str, Any]]) -> None:
    system, _ = reloadable
    app_file = system.config_dir / "app_config.json"
    app = json.loads(app_file.read_text())
    app["limits"] = {**app.get("limits", {}), "max_restarts": 2, "restart_backoff_s": 0.2}
    app_file.write_text(json.dumps(app))
    out = system.cli("reload")
    assert out.returncode == 0 and "settings: limits" in out.stdout, out  # (it said "no change")


def test_bad_config_is_refused_and_the_old_one_kept(reloadable: tuple[System, dict[str, Any]]) -> None:
    system, base = reloadable
    write_models(system, {A: {**base, "parameters": {"threads": "many"}}})
    out = system.cli("reload")
    assert out.returncode == 1 and "models_config.json" in out.stderr and "threads" in out.stderr
    assert A in names(system)
    # a gateway that dies meanwhile starts again on the config the supervisor runs on (it read the user's file,
    # refused by the reload: it exited at every restart, its port down until the file was fixed)
    old_pid = next(p["pid"] for p in system.status()["processes"] if p["name"] == "gateway-ollama")
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: any(p["name"] == "gateway-ollama" and p["pid"] not in (0, old_pid) and p["state"] == "running"
                         for p in system.status()["processes"]), 30, "the gateway started again")
    wait_for(lambda: _answers(system.ollama_url + "/api/tags"), 30, "the gateway answering")
    assert A in names(system)
    write_models(system, {A: base})
    assert system.cli("reload").returncode == 0


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sighup_reloads(reloadable: tuple[System, dict[str, Any]]) -> None:
    system, base = reloadable
    write_models(system, {A: base, "smollm2-hup": base})
    system.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "smollm2-hup" in names(system), 20, "model added by SIGHUP listed")


def test_a_model_whose_file_is_missing_fails_its_request_clearly_and_is_not_retried_meanwhile(
        reloadable: tuple[System, dict[str, Any]]) -> None:
    """Its load failed and its request had a 500 naming the file; it then stayed stopped (it was restarted in the
    background with backoff, up to 'fatal', where even a request after the file arrived was refused); the next
    request tries again and, once the file is there, is served."""
    system, base = reloadable
    later = system.config_dir / "arrives-later.gguf"
    write_models(system, {A: base, "other": base, "later": {**base, "model_path": str(later)}})
    assert system.cli("reload").returncode == 0
    c = ollama.Client(system.ollama_url, timeout=120)
    # (listed as Ollama and LM Studio list: only the models that are there; a client offered it, to fail)
    assert "later:latest" not in {m.model for m in c.list().models} and "other:latest" in {m.model for m in
                                                                                          c.list().models}
    with pytest.raises(ollama.ResponseError) as missing:
        c.show("later")
    assert missing.value.status_code == 404 and str(later) in missing.value.error
    listed = httpx.get(system.openai_url + "/models", timeout=10).json()["data"]
    assert "later" not in {m["id"] for m in listed} and "other" in {m["id"] for m in listed}
    assert httpx.get(system.openai_url + "/models/later", timeout=10).status_code == 404
    for name in (A, "other"):  # the two models max_loaded_models lets in: neither is evicted for a load that fails
        assert c.generate(model=name, prompt="hi", options={"num_predict": 1}).done
    for _ in range(6):  # (the reason lost a race with the worker's exit half the time: "exited with code 3")
        with pytest.raises(ollama.ResponseError) as err:
            c.generate(model="later", prompt="hi", options={"num_predict": 1})
        assert err.value.status_code == 500 and f"model file not found: {later}" in err.value.error, err.value.error
        w = system.worker("later")
        assert w["state"] == "stopped" and "model file not found" in w["message"], w
    assert system.worker(A)["state"] == system.worker("other")["state"] == "ready"  # (one was evicted first)
    # Ollama's 500, and the openai client's own "do not retry" (it was a 503 with Retry-After: three loads)
    r = httpx.post(system.openai_url + "/chat/completions", json={"model": "later", "messages": [
        {"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 500 and r.headers.get("x-should-retry") == "false" and "retry-after" not in r.headers
    time.sleep(1.5)  # (a background retry came after 1 s)
    w = system.worker("later")
    assert w["state"] == "stopped" and w["restarts"] == 0 and w["pid"] == 0, w
    for verb in ("start", "restart"):  # an operator's too: refused at once, nothing evicted, no retries (it went
        out = system.cli(verb, "later")  # fatal after five, having evicted an idle model first)
        assert out.returncode != 0 and f"model file not found: {later}" in out.stdout + out.stderr, out
    time.sleep(1.5)
    w = system.worker("later")
    assert w["state"] == "stopped" and w["restarts"] == 0 and w["pid"] == 0, w
    assert system.worker(A)["state"] == system.worker("other")["state"] == "ready"
    cfg = load_config()
    later.symlink_to(cfg.model_path(cfg.models.models[A]))
    assert c.generate(model="later", prompt="hi", options={"num_predict": 1}).done
    assert "later:latest" in {m.model for m in c.list().models} and c.show("later").modelfile


def test_a_reload_that_breaks_a_model_loaded_for_requests_does_not_retry_it_in_the_background(
        reloadable: tuple[System, dict[str, Any]]) -> None:
    """The reload restarts it with its new settings; that load fails: it stops there (it was retried with backoff
    as if an operator had started it), and the next request tries again."""
    system, base = reloadable
    write_models(system, {A: base, "breaks": base})
    assert system.cli("reload").returncode == 0
    c = ollama.Client(system.ollama_url, timeout=120)
    assert c.generate(model="breaks", prompt="hi", options={"num_predict": 1}).done
    write_models(system, {A: base, "breaks": {**base, "model_path": "/nonexistent/breaks.gguf"}})
    assert system.cli("reload").returncode == 0
    wait_for(lambda: (w := system.worker("breaks"))["state"] in ("stopped", "backoff")
             and "model file not found" in w["message"], 60, "the restart with the new settings to fail")
    time.sleep(1.5)  # (a background retry came after 1 s)
    w = system.worker("breaks")
    assert w["state"] == "stopped" and "model file not found" in w["message"] and w["pid"] == 0, w
